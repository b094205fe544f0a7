"""The wmdeploy model zoo: working-memory architectures, their training recipe and small checkpoints.

Importing this package imports nothing heavy; each model lives in its own module (which needs torch)::

    from wmdeploy.models.zoo import ZOO, load_zoo_model
    model = load_zoo_model("gru_attention")          # trained on associative recall
"""
