"""Pool internals the runtime shares: the engine calls of one step (:mod:`.calls`, all-or-nothing across
arenas), a pool's limits and byte sizes (:mod:`.limits`), and pools whose KV memory follows each stream's
context (:mod:`.tiered`: capacity tiers and a byte budget). Torch-free; imports nothing of ``streaming``
(the tiered pool is handed the one-tier pool class), so ``streaming`` can build on it."""
