# The config tree is a package so that Hydra finds it as `pkg://dlntorch.conf` from any cwd and
# any install. Importing it registers the schemas (dlntorch/config.py) that `defaults: [schema]`
# and each optim yaml's `defaults: [<name>_schema]` need.
from dlntorch import config as _schema

_schema.register()
