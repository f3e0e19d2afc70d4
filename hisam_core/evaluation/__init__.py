"""Offline evaluation (paper Sec. 4.1-4.3): the protocol (:mod:`.protocol`), the rankers of the
comparison (:mod:`.baselines`), the semantic-ID variants (:mod:`.semantic`) and the harness
(:mod:`.harness`, entry point :func:`~hisam_core.evaluation.harness.run_evaluation`)."""
