"""Efficient computation sharing (Shoouri et al., ICCV 2023): sub-tasks as sparse gated weight deltas of a
base task's ViT, sharing activations across tasks and video frames.

- :mod:`.model`: the trainable network (:class:`SharingModel`, :class:`GatedDelta`), its builder and
  the storage of its deltas;
- :mod:`.inference`: the token-skipping runtime (:class:`SharedInference`) it is deployed as;
- :mod:`.dense`: every task run densely at its test-time weights (:class:`DenseSharing`), the form exported
  to ONNX;
- :mod:`.architecture`: the ``sharing`` row of :data:`densemtl.registry.ARCHITECTURES` (build, the four
  training phases, deployment, export).
"""
