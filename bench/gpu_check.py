"""``make gpu-check``: the KV data path and the engine arguments on a GPU host.

1. Fails at once, saying why, where no CUDA device is visible.
2. Runs the KV block tests on CUDA caches (``SHOAL_TEST_DEVICE=cuda``):
   byte-exact gather and scatter for every attention layout and dtype, and
   two connectors staging and loading blocks over loopback.
3. Measures the mover on a LLaMA-7B-sized cache: gather into pinned host
   memory (device to host) and scatter back (host to device), in GiB/s.
4. Prints the engine arguments Shoal would choose here (instance/engine_args.py).

    make gpu-check          # EXTRAS=gpu,dev make setup first, for vLLM's CUDA build
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import REPO

TESTS = ["tests/migration/test_kv_blocks.py", "tests/migration/test_transport.py"]


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"gpu-check needs a CUDA device: torch {torch.__version__} sees none "
                 f"(CUDA build: {torch.version.cuda or 'no, a CPU build'}; "
                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                 "On a GPU host install the CUDA build: EXTRAS=gpu,dev make setup")  # fmt: skip


def _tests() -> None:
    env = {**os.environ, "SHOAL_TEST_DEVICE": "cuda"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    if subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode != 0:
        sys.exit("gpu-check: the KV block tests failed on CUDA")


def _throughput() -> tuple[float, float, float]:
    """(MiB moved, gather GiB/s, scatter GiB/s) for 1,024 tokens of LLaMA-7B in fp16."""
    import torch

    from migration.kv_blocks import BlockMover, host_buffer

    num_blocks, count = 128, 64  # blocks of 16 tokens: 8 MiB each over 32 layers
    layers = [torch.randn(num_blocks, 32, 16, 256, device="cuda", dtype=torch.float16)
              for _ in range(32)]  # fmt: skip
    mover = BlockMover(layers, num_blocks)
    ids = list(range(num_blocks - 1, num_blocks - 1 - count, -1))
    buffer = host_buffer(count * mover.block_bytes, mover.device)
    gather, scatter = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        mover.gather(ids, buffer)
        gather.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mover.scatter(buffer, count, list(range(count)))
        torch.cuda.synchronize()
        scatter.append(time.perf_counter() - t0)
    gib = buffer.numel() / 1024**3
    return buffer.numel() / 1024**2, gib / min(gather), gib / min(scatter)


def main() -> None:
    _require_cuda()
    _tests()
    mib, d2h, h2d = _throughput()
    from infra.settings import InstanceSettings
    from instance.engine_args import describe, detect_platform

    print("\ngpu-check summary")
    print(f"  KV block tests on CUDA: passed ({', '.join(TESTS)})")
    print(f"  gather to pinned host: {d2h:.1f} GiB/s, scatter to device: {h2d:.1f} GiB/s "
          f"({mib:.0f} MiB, LLaMA-7B fp16 layout)")  # fmt: skip
    settings = InstanceSettings()
    model = settings.model or "(the generated tiny model)"
    print("  engine arguments Shoal chooses here (docs/ENGINE.md):")
    for line in describe(settings, detect_platform(), model).splitlines():
        print("    " + line)


if __name__ == "__main__":
    main()
