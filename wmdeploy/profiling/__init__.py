"""The profiling wing: ``wmdeploy profile`` on this machine (``runner``) or against a running server
(``server``), both producing the report types of ``report`` (rendered by ``table`` and ``plot``), timed by
``timing``'s stable windows against the floors that ``machine`` measures.

It may import the core (contract, errors, runners, streaming, inspect) and the runtimes; nothing outside
the CLI imports it. The public functions are ``wmdeploy.profile`` and ``wmdeploy.profile_server``.
"""
