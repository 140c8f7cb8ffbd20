import cProfile, pstats, numpy as np, cudcn, sys
size, C, G = map(int, sys.argv[1:4])
N, D = 2, C // G
rng = np.random.default_rng(0)
x = rng.standard_normal((N, size, size, C), dtype=np.float32)
off = rng.uniform(-2, 2, (N, size, size, G * 18)).astype(np.float32)
m = rng.random((N, size, size, G * 9), dtype=np.float32)
go = np.ones((N, size, size, C), np.float32)
args = (3, 3, 1, 1, 1, 1, 1, 1, G, D, 1.0, 256, False)
from cudcn.backends.numpy import parallel
parallel.cpu_count = lambda: 1
def step():
    for _ in range(10):
        cudcn.dcnv3(x, off, m, *args); cudcn.dcnv3_backward(go, x, off, m, *args)
step()
cProfile.run("step()", "/tmp/prof.out")
pstats.Stats("/tmp/prof.out").sort_stats("tottime").print_stats(14)
