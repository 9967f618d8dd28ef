"""The DAGs' ``Param`` forms, one module per DAG, and their conversion to the stages' config dataclasses.

* :mod:`.common` — what several DAGs ask for (batch, bucket, working size, registered model) and
  :func:`.common.default`, which reads a default from a config dataclass so it is kept once;
* :mod:`.training` — ``bgremoval_training``'s form, grouped in sections;
* :mod:`.inference` — ``bgremoval_inference``'s form;
* :mod:`.retraining` — ``bgremoval_retraining``'s form.
"""
