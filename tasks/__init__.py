"""Every generated text fot trains or evaluates on, one module per task family.

The evaluations (eval/) and the trainer (train/) both read their prompts and documents from here, so a format is
written once and a held-out evaluation string can be kept out of training by a scan (``tasks.heldout``). This
package imports fot and plumbing only, never train/ or eval/; generators are pure functions of a seed (numpy
generators), so the same seed gives the same documents (tests/test_tasks_digests.py).
"""
