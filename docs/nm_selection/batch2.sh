B="scripts/bench_methods.py --tasks mnist1d-mlp --sparsities 0.5 --seeds 10 --validation 1000"
P=".venv/bin/python"
export OMP_NUM_THREADS=1
while pgrep -f batch1.sh > /dev/null; do sleep 5; done
$P $B --methods rigl --n-m 2 4 --overrides n_m_rule=swap --out runs/nm_explore/rigl_2of4_swap
$P $B --methods rigl --n-m 2 4 --overrides n_m_rule=swap drop_schedule=constant end_fraction=0.9 --out runs/nm_explore/rigl_2of4_swap_const
$P $B --methods rigl --n-m 2 4 --overrides drop_schedule=constant end_fraction=0.9 --out runs/nm_explore/rigl_2of4_const
$P $B --methods rigl --overrides drop_schedule=constant end_fraction=0.9 --out runs/nm_explore/unstructured_const
