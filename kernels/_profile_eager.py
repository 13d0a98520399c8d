"""Where the host time of one eager add_lora call goes (run on a GPU machine):

python -m kernels._profile_eager
"""

import cProfile
import pstats
import time

import torch

from kernels import add_lora, build_lora_meta
from kernels._bench import make_problem

if __name__ == "__main__":
    p = make_problem(64, 4096, 4096, adapters=8)
    m = build_lora_meta(p.slots, p.weights, 64)
    call = lambda: add_lora(p.y, p.x, [p.a], [p.b], p.ranks, p.scales, m)  # noqa: E731
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        call()
    print(f"eager add_lora host time: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call")
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
