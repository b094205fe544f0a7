"""``python -m wmdeploy`` is the ``wmdeploy`` command."""
from .cli import main

main()
