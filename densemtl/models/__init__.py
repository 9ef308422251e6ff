"""Networks: backbones, decoders, the baselines and the three methods' architectures."""
