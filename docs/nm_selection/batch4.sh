B="scripts/bench_methods.py --tasks mnist1d-mlp --sparsities 0.75 --seeds 10 --validation 1000"
P=".venv/bin/python"
export OMP_NUM_THREADS=1
$P $B --methods rigl --out runs/nm_explore/u75
$P $B --methods rigl --n-m 1 4 --overrides n_m_rule=swap --out runs/nm_explore/swap_1of4
$P $B --methods rigl --n-m 1 4 --overrides n_m_rule=drop --out runs/nm_explore/drop_1of4
$P $B --methods rigl --n-m 2 8 --overrides n_m_rule=swap --out runs/nm_explore/swap_2of8
$P $B --methods rigl --n-m 2 8 --overrides n_m_rule=drop --out runs/nm_explore/drop_2of8
