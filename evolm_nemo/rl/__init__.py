"""RL on the one engine: the outer loop owns rollouts (the live actor through megatron-core's inference engine),
rewards (the shared answer checker) and advantages (GAE or group-relative); each update is the engine's
``train_step`` with the RL objective (``rl.objectives``), checkpoints are the engine's. PPO and GRPO share it all."""
