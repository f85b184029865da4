"""The one exception type the command-line programs turn into a one-line message and exit status 2."""


class UserError(ValueError):
    """Something the user asked for or supplied is wrong: bad arguments, missing or corrupt files.

    The message says what is wrong and, where it helps, what to do; `train.py` and `eval.py`
    print it on one line of stderr and exit with status 2 instead of showing a traceback.
    """
