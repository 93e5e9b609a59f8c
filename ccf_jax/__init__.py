"""ccf_jax: a JAX/Flax trainer for long-context language models that compress their context (CCF).

See WORKSPACE.md for the map of the code and README.md for the two commands that run everything.
"""

__version__ = '0.1.0'
