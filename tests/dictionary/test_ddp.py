"""Data-parallel training under torchrun: 2 gloo processes on the CPU vs 1 process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from plate_concepts.dictionary import fit_dictionary, load_dictionary
from plate_concepts.embeddings.store import EmbeddingStore

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)

DIM, N_ATOMS, N = 16, 24, 2000
FIT = {"method": "icfl", "n_features": 32, "n_rounds": 1, "per_round": 2, "steps": 150, "lr": 1e-2,
       "device": "cpu", "log_every": 50, "checkpoint_every": 0, "seed": 0}

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from plate_concepts.dictionary import fit_dictionary
    import torch.distributed as dist

    store, out, rank_out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    result = fit_dictionary(store, out, **options)
    # Every rank reports its replica so the test can check they stayed identical.
    rank = int(__import__("os").environ["RANK"])
    model = result.model_
    save_file({"decoder": model.decoder.detach().contiguous(), "bias": model.bias.detach().contiguous(),
               "tokens_since_fired": model.tokens_since_fired.contiguous()}, f"{rank_out}{rank}.safetensors")
    assert not dist.is_initialized(), "fit_dictionary must tear down the group it created"
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planted_store(path) -> np.ndarray:
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(N_ATOMS, DIM))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    tokens = rng.normal(scale=0.02, size=(N, DIM))
    is_control = rng.random(N) < 0.2
    for i in np.flatnonzero(~is_control):
        tokens[i] += (rng.random(2) + 0.5) @ atoms[rng.choice(N_ATOMS, 2, replace=False)]
    obs = pd.DataFrame({"plate": "P1", "well": "B02", "field": 1, "crop_y": np.arange(N), "crop_x": 0,
                        "crop_size": 64, "is_control": is_control})
    store = EmbeddingStore.create(path, dim=DIM, chunk_rows=50)
    store.append(tokens.astype(np.float32), obs)
    return atoms


def quality(path, store_path, atoms: np.ndarray) -> tuple[float, float]:
    """(FVU over the whole store, fraction of planted atoms matched by a feature at cosine > 0.9)."""
    model, whitening, _ = load_dictionary(path)
    x = whitening.transform_torch(torch.from_numpy(EmbeddingStore.open(store_path).read()))
    with torch.no_grad():
        x_hat = model.decode(model.encode(x))
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    directions = torch.nn.functional.normalize(
        whitening.transform_torch(torch.from_numpy(atoms).float() + torch.from_numpy(whitening.control_mean_).float()), dim=1
    )
    best = (directions @ torch.nn.functional.normalize(model.decoder, dim=1).T).max(dim=1).values
    return fvu, float((best > 0.9).float().mean())


def test_two_gloo_processes_train_as_well_as_one(tmp_path):
    import json

    atoms = planted_store(tmp_path / "store")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("WORLD_SIZE", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), str(tmp_path / "store"), str(tmp_path / "ddp.safetensors"), str(tmp_path / "rank"),
        json.dumps({**FIT, "batch_size": 64}),  # 64 per rank: the same 128 tokens per step as below
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    replicas = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for name in replicas[0]:
        assert torch.equal(replicas[0][name], replicas[1][name]), f"ranks disagree on {name}"
    _, _, meta = load_dictionary(tmp_path / "ddp.safetensors")
    assert meta["training"]["world_size"] == 2 and meta["training"]["tokens_seen"] == 150 * 128
    assert torch.equal(load_dictionary(tmp_path / "ddp.safetensors")[0].decoder, replicas[0]["decoder"])

    fit_dictionary(tmp_path / "store", tmp_path / "single.safetensors", batch_size=128, **FIT)
    fvu_ddp, recovered_ddp = quality(tmp_path / "ddp.safetensors", tmp_path / "store", atoms)
    fvu_one, recovered_one = quality(tmp_path / "single.safetensors", tmp_path / "store", atoms)
    assert recovered_one >= 0.9 and recovered_ddp >= 0.9
    assert abs(fvu_ddp - fvu_one) < 0.05, (fvu_ddp, fvu_one)
