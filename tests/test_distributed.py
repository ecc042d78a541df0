"""DDP: 2 processes on CPU (gloo) must give the loss and gradients of one process on the
concatenated batch; torchrun drives train.py end to end."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY_CAPTIONS, TINY_MODEL, wordpiece_tokenizer
from clip_foundation.data.splits import UniqueImageBatchSampler

pytestmark = pytest.mark.distributed  # gloo process groups and torchrun

ROOT = Path(__file__).resolve().parents[1]
WORLD, BATCH = 2, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_inputs():
    """A tiny model (no dropout: ranks draw different masks) and 8 image/caption pairs."""

    from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
    from clip_foundation.data.records import Record
    from clip_foundation.training.inputs import Inputs
    torch.manual_seed(0)
    cfg = CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=2, heads=2, stem="linear"),
                     text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=100, pooling="mean"),
                     projection_dim=16, dropout=0.0)
    captions = [f"{c} number {i}" for i, c in enumerate(TINY_CAPTIONS * 3)][:BATCH]
    # A fixed vocabulary: a tokenizer trained in each process could number its tokens differently
    words = sorted({w for c in captions for w in c.split()})
    model = CLIPModel(cfg, tokenizer=wordpiece_tokenizer(words))
    records = [Record(image=Path(f"{i}.jpg"), captions=[c]) for i, c in enumerate(captions)]
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return model, Inputs(model, records, images, augment=False)


def step(model, embedder, inputs, index, loss_fn, accum, no_sync=None):
    import contextlib
    from clip_foundation.training.step import contrastive_backward
    rows = inputs.batch_rows(index, torch.device("cpu"))
    micro = list(zip(rows.chunk(accum), index.chunk(accum)))
    return contrastive_backward(embedder, micro, model.scale, loss_fn, "fp32", torch.device("cpu"),
                                no_sync or contextlib.nullcontext)


def worker(rank, port, accum, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    from clip_foundation.common import distributed
    from clipModel import gathered_clip_loss
    from clip_foundation.training.inputs import Embedder
    distributed.setup(torch.device("cpu"))
    model, inputs = setup_inputs()
    ddp = torch.nn.parallel.DistributedDataParallel(Embedder(model, inputs, augment=False))
    share = torch.arange(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)  # the sampler's contiguous share
    loss = distributed.mean(step(model, ddp, inputs, share, gathered_clip_loss, accum, ddp.no_sync))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    distributed.teardown()


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, accum):
    from clipModel import clip_loss
    from clip_foundation.training.inputs import Embedder
    mp.spawn(worker, args=(free_port(), accum, str(tmp_path)), nprocs=WORLD, join=True)
    model, inputs = setup_inputs()
    loss = step(model, Embedder(model, inputs, augment=False), inputs, torch.arange(BATCH), clip_loss, 1)
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss)
        assert got["grads"].keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-4, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_shards_each_global_batch_over_ranks(world):
    counts = [5] * 40
    whole = list(UniqueImageBatchSampler(counts, 8, captions_per_epoch=2, seed=3))
    shards = [list(UniqueImageBatchSampler(counts, 8, captions_per_epoch=2, seed=3, rank=r, world_size=world))
              for r in range(world)]
    assert all(len(s) == len(whole) for s in shards)
    for k, batch in enumerate(whole):
        assert sum((s[k] for s in shards), []) == batch  # rank order = the global batch's order
    with pytest.raises(ValueError, match="split evenly"):
        UniqueImageBatchSampler(counts, 9, world_size=2)


def test_torchrun_trains_with_two_processes(tmp_path):
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    data = generate(tmp_path / "data", SyntheticConfig(n_train=80, n_val=20, n_test=20), progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "train.py", f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--run_name=ddp", "--device=cpu",
           "--epochs=2", "--batch_size=20", "--warmup_steps=2", "--progress=false", "--log_every=3",
           f"--cache_dir={tmp_path / 'cache'}", *TINY_MODEL]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    assert done.stdout.count("training on cpu x 2 processes") == 1  # only rank 0 speaks
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    # 80 images / 20 per global batch = 4 steps per epoch; every 3rd step and each epoch's last are logged
    assert [e["step"] for e in log if "loss" in e] == [3, 4, 6, 8]
    assert json.loads((run / "metrics.json").read_text())["split"] == "test"
    assert (run / "last" / "trainer_state.pt").is_file()
