"""Two nodes: two `torchrun --nnodes=2` launchers on localhost (gloo, CPU) stream shards; the
ranks read disjoint shards and the trained model equals one process's on the same global batches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, wordpiece_tokenizer
from test_distributed import free_port

pytestmark = pytest.mark.distributed  # two torchrun launchers

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("webdataset", reason="webdataset is not installed (requirements.txt)")


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory):
    from clip_foundation.data import shards
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("nodes")
    src = generate(root / "src", SyntheticConfig(n_train=48, n_val=8, n_test=8), progress=False)
    shards.main([str(src), str(root / "shards"), "--shard_size=6", "--progress=false"])
    # a text tower with a fixed vocabulary (a scratch tokenizer numbers its tokens differently in
    # each run) and no dropout (each rank would draw its own masks)
    from transformers import DistilBertConfig, DistilBertModel
    words = sorted({w for line in (src / "captions.csv").read_text().splitlines()[1:]
                    for w in line.split(",")[1].replace(":", " ").split()})
    wordpiece_tokenizer(words).save_pretrained(root / "bert")
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=5 + len(words), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                     dropout=0.0, attention_dropout=0.0)).save_pretrained(root / "bert")
    return root


def args(root, name):
    # no augmentation or dropout (the ranks would draw other random numbers than one process), and
    # the linear patch stem: the conv stem's BatchNorm takes its statistics per rank
    return ["--text.kind=hf", f"--text.name={root / 'bert'}", "--image.stem=linear", f"--data={root / 'shards/train'}", f"--val_data={root / 'shards/val'}", f"--out_dir={root / 'runs'}",
            f"--run_name={name}", "--device=cpu", "--epochs=1", "--batch_size=8", "--train_samples=40",
            "--warmup_steps=1", "--log_every=1", "--progress=false", "--tensorboard=false", "--augment=false", "--dropout=0",
            "--streams=2", "--shuffle_buffer=4", f"--cache_dir={root / 'cache'}", *TINY_MODEL,
            "--precision=fp32"]  # equal losses need fp32: bf16 steps (a CPU with bf16 units) round per batch split


def test_two_nodes_read_disjoint_shards_and_match_one_process(shard_data):
    root, port = shard_data, free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", *args(root, "nodes"), "--workers=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    assert all(p.returncode == 0 for p in launchers), "\n".join(o[-3000:] for o in outputs)
    assert "training on cpu x 2 processes" in outputs[0]
    one = subprocess.run([sys.executable, "train.py", *args(root, "one"), "--workers=2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    nodes = torch.load(root / "runs/nodes/last/trainer_state.pt", weights_only=False)
    single = torch.load(root / "runs/one/last/trainer_state.pt", weights_only=False)
    read = [set(r.get(0, [])) for r in nodes["stream"]["read_by_rank"]]
    assert len(read) == 2 and all(read) and not read[0] & read[1]  # each rank its own shards
    assert nodes["stream"]["positions"] == single["stream"]["positions"]
    losses = [[e["loss"] for e in run["history"] if "loss" in e] for run in (nodes, single)]
    assert len(losses[0]) == 5
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)  # same start, same first global batch
    # later steps drift only by float noise, which Adam's normalised updates amplify (a wrong batch: ~3%)
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
