"""Exact ground-truth testbed (SPEC §5): tabular targets (`tabular`, `tabular_fit`), misspecified
preference models (`misspecification`), the synthetic-language level (`lm`, written separately) and
the experiments that check the framework's claims (`experiments`, run by `distalign testbed`)."""
