# The config tree is a package so that Hydra finds it as `pkg://dlntorch.conf` from any cwd and
# any install. Importing it registers the schema (dlntorch/config.py) that `defaults: [schema]` needs.
from dlntorch import config as _schema  # noqa: F401
