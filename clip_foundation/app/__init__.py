"""The search page: its command line and its Gradio page (`SearchPage`)."""
