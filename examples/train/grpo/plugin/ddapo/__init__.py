"""The DDAPO attention-balance reward for ms-swift GRPO, in three layers (one reward call runs top to bottom):

    ms_swift/  the ms-swift side, the only code that imports ms-swift or reaches private names of ms-swift,
               transformers or accelerate: compat (the compatibility list), model_spec, encoding (rows and the
               template's encoding, the system-turn probe), forward_env (no-grad policy forwards, every state
               restored), attention (the attention functions registered with transformers), trainer_io (metrics,
               trackers, the token-weight channel, the rollout engine's name), adapter (`SwiftTrainer`)
    engine/    forwards: scheduler (which outputs share a forward, lockstep padding where forwards are collective)
               and capture (the Eq. (1) sums of every attention layer, per output); pure torch
    core/      pure formulas and records, no ms-swift and no transformers: formulas (Eq. 1-11), key_sets (T, V),
               packing, scorer (one output's reward, the group variants), diagnostics (the ddapo/* metrics),
               config (the DDAPO_* settings), report (report.md and its pictures)

`reward.DDAPOAttentionORM` runs them in that order; `step_log` turns a call's results into the step's metrics and
report; `answer_match.AnswerMatchORM` is the accuracy reward paired with it. ``plugin.py`` beside this package
applies the ms-swift patches and registers both rewards.
"""
