"""Tools that drive this project from outside it: run from a checkout, never installed (setup.py
packages preresnet alone), and imported by nothing in preresnet/, bench/, train.py, eval.py or
hubconf.py; a tool may import those, which sit below it."""
