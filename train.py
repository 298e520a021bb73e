"""Train any tokenizer: ``python train.py tokenizer=fqgan_triple`` (see README)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from training.run import train  # after Hydra: config errors surface before heavy imports

    train(cfg)


if __name__ == "__main__":
    main()
