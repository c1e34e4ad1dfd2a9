B="scripts/bench_methods.py --tasks mnist1d-mlp --sparsities 0.5 --seeds 10 --validation 1000"
P=".venv/bin/python"
export OMP_NUM_THREADS=1
$P $B --methods rigl --out runs/nm_explore/unstructured
$P $B --methods rigl --n-m 2 4 --out runs/nm_explore/rigl_2of4
$P $B --methods rigl --overrides distribution=uniform --out runs/nm_explore/unstructured_uniform
$P $B --methods rigl --n-m 2 4 --overrides 'exclude=["0.weight"]' --out runs/nm_explore/rigl_2of4_dense0
$P $B --methods rigl --overrides distribution=uniform 'exclude=["0.weight"]' --out runs/nm_explore/uniform_dense0
$P $B --methods rigl --n-m 2 4 --overrides 'exclude=["4.weight"]' --out runs/nm_explore/rigl_2of4_dense4
$P $B --methods rigl --overrides distribution=uniform 'exclude=["4.weight"]' --out runs/nm_explore/uniform_dense4
