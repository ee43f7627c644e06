"""A round's training block, ``block.train_block``, and what it is made of: the batches each rank draws
(``batches``, ``sampler``), the state it saves and resumes exactly (``state``), its metrics log (``metrics``)
and its answer to a pre-emption signal (``preemption``). ``deepercluster.launch`` runs it through submitit."""
