B="scripts/bench_methods.py --tasks mnist1d-mlp --sparsities 0.5 --seeds 10 --first-seed 10 --validation 1000"
P=".venv/bin/python"
export OMP_NUM_THREADS=1
while pgrep -f batch2.sh > /dev/null; do sleep 5; done
$P $B --methods rigl --out runs/nm_explore/b_unstructured
$P $B --methods rigl --n-m 2 4 --out runs/nm_explore/b_rigl_2of4
$P $B --methods rigl --n-m 2 4 --overrides n_m_rule=swap --out runs/nm_explore/b_rigl_2of4_swap
$P $B --methods set --n-m 2 4 --out runs/nm_explore/b_set_2of4
$P $B --methods set --n-m 2 4 --overrides n_m_rule=swap --out runs/nm_explore/b_set_2of4_swap
