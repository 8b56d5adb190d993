"""Hyper-parameters that make the embedded base model memorise a handful of prompt/completion pairs,
found by trying (see tests/worker/test_memorize.py). The end-to-end API test reuses them.

Measured on 2 shared CPU cores, 1 torch thread: ~3-5 s of training for 100 steps. With the same lr and
batch, 60 linear-decay steps were not enough (4 of 6 reproduced); 80 were (6 of 6); 100 leaves a margin.
"""

MEMORIZE_RECORDS = [
    {"prompt": "Capital of France?\n", "completion": "Paris."},
    {"prompt": "Capital of Japan?\n", "completion": "Tokyo."},
    {"prompt": "Color of the sky?\n", "completion": "Blue sky."},
    {"prompt": "What is 2 + 2?\n", "completion": "Four."},
    {"prompt": "Opposite of hot?\n", "completion": "Cold ice."},
    {"prompt": "Largest planet?\n", "completion": "Jupiter."},
]

# Request bodies as POST /jobs takes them: `bone` and `training`.
MEMORIZE_RECIPE = {
    "bone": {"r": 8},  # default targets (q_proj, v_proj for Llama), Bone init (zeros)
    "training": {
        "max_steps": 100,
        "learning_rate": 1e-2,
        "lr_scheduler": "linear",
        "warmup_steps": 0,
        "batch_size": 6,  # the whole dataset per step
        "max_seq_length": 64,
        "seed": 42,
    },
}
