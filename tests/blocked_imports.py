"""Runs Python code in a process where the libraries of the data, harness, TensorBoard and bucket
paths cannot be imported, as on the lent GPU machine's image, which lacks them:

    python tests/blocked_imports.py -m MODULE [ARG...]    (as `python -m MODULE ARG...`)
    python tests/blocked_imports.py -c CODE

An import of any of BLOCKED (or of a submodule) raises ModuleNotFoundError, whether or not the
library is installed, so a test that passes here cannot pass by accident on a machine that has it.
"""

import importlib.abc
import runpy
import sys

BLOCKED = ('seqio', 'tensorflow', 'tensorflow_text', 'lm_eval', 'tensorboardX', 'gcsfs')


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)
        return None  # the other finders look for it


if __name__ == '__main__':
    sys.meta_path.insert(0, Refuse())
    flag, target, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if flag == '-m':
        sys.argv = [target, *args]
        runpy.run_module(target, run_name='__main__', alter_sys=True)
    else:
        exec(compile(target, '<-c>', 'exec'), {'__name__': '__main__'})
