"""The reference's vanilla-NeRF command, kept as a thin wrapper of train.py (spec vision 3.5):

    python train_mlp_nerf.py --config configs/nerf/lego.yaml --config_id 3 [train.py options]

is ``python train.py`` with the same arguments (config id 3 of configs/nerf/{lego,drums}.yaml is the vanilla
NeRF; its 50,000 steps and Adam 5e-4 are in the config, where the reference hard-coded them).
"""
from train import main

if __name__ == "__main__":
    main()
