"""The U2-Net family, written in this project.

* :mod:`tasks.model.config` — names, sizes and channel widths (no PyTorch: configuration and the
  DAGs' forms import it);
* :mod:`tasks.model.blocks` and :mod:`tasks.model.u2net` — the network;
  ``build_model("u2net")`` gives the full one (44.0 M parameters), ``build_model("u2netp")`` the
  small one (1.13 M); both return logits;
* :mod:`tasks.model.preprocess` — the one preprocessing of training, evaluation and serving;
* :mod:`tasks.model.io`, :mod:`tasks.model.export`, :mod:`tasks.model.pretrained` — loading,
  ONNX export and the published weights.

The package imports nothing itself, so importing a light module does not import PyTorch.
"""
