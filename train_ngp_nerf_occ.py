"""The reference's grid-NeRF command, kept as a thin wrapper of train.py (spec vision 3.5):

    python train_ngp_nerf_occ.py --config configs/nerf/lego.yaml --config_id N [train.py options]

is ``python train.py`` with the same arguments: the NeRF task (``task.type: nerf``) runs through the one training
loop. Evaluate the run with ``python test.py --run <run dir>``.
"""
from train import main

if __name__ == "__main__":
    main()
