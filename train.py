"""Train any tokenizer: ``python train.py tokenizer=fqgan_triple`` (see README, ``--help``)."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # Config and path checks first, without torch: a mistake stops here in about a second,
    # as one message, and the run directory Hydra just made is removed again.
    from training.preflight import ConfigError, fail, preflight

    try:
        preflight(cfg)
        from training.run import train

        train(cfg)  # raises ConfigError for a missing file found while building (before training)
    except ConfigError as exc:
        fail(exc, cfg.paths.output_dir)


if __name__ == "__main__":
    from training.preflight import check_overrides

    check_overrides(CONF, "train", sys.argv[1:])
    main()
