"""The transform wing: what is done to an exported file before it ships.

``optimizer`` (graph optimisation), ``quantizer`` with its parts (``policy``: which nodes stay float;
``precision``: what each weight became; ``fp16``; ``int4``: 4-bit weights; ``report``; ``check``: the
loads-and-still-works checks),
``calibration`` (stateful calibration streams), ``lineage`` (the record of what was done, in the file)
and ``drift`` (how far a transformed file's memory drifts from its source over a long stream).

It may import the core (contract, errors, runners, verifier) and ``models.tasks`` (numpy only); nothing
in the core, the runtime or the server imports it. The public functions are ``wmdeploy.optimize``,
``wmdeploy.quantize`` and ``wmdeploy.drift_report``.
"""
