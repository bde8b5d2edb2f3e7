"""RL's parts, used by the RL stage (``stages.rl``): prompts (``data``), rollouts from the live actor through
megatron-core's inference engine (``rollout``), rewards from the shared answer checker or a reward model (``reward``),
the RL objectives for the engine's ``train_step`` (``objectives``) and the step's statistics (``stats``)."""
