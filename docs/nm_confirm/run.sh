B="scripts/bench_methods.py --tasks mnist1d-mlp --sparsities 0.5 --seeds 20 --first-seed 100"
export OMP_NUM_THREADS=1
.venv/bin/python $B --methods rigl --out runs/nm_confirm/unstructured
.venv/bin/python $B --methods rigl --n-m 2 4 --out runs/nm_confirm/swap
.venv/bin/python $B --methods rigl --n-m 2 4 --overrides n_m_rule=drop --out runs/nm_confirm/drop
S="drop_schedule=constant end_fraction=0.9"
.venv/bin/python $B --methods rigl --overrides $S --out runs/nm_confirm/unstructured_const
.venv/bin/python $B --methods rigl --n-m 2 4 --overrides $S --out runs/nm_confirm/swap_const
C=runs/nm_confirm
.venv/bin/python scripts/bench_methods.py --combine $C/unstructured $C/swap=+2of4 $C/drop=+2of4-drop \
  $C/unstructured_const=+const $C/swap_const=+2of4-const \
  --pairs rigl+2of4:rigl rigl+2of4:rigl+2of4-drop rigl+2of4-const:rigl+const --out $C/all
