"""The module ``celery -A workers.app`` names: the only place a global app is bound.

Settings come from the environment (``PROMPTBATCH_REDIS_URL`` and friends)::

    celery -A workers.app worker -Q pb.critical,pb.high,pb.normal,pb.low,pb.bulk
    promptbatch flower            # (celery -A workers.app flower, with our options)
"""

import sys

from config.settings import Settings
from workers.factory import create_app

_settings = Settings()
if not _settings.redis_url:  # one clear line instead of a traceback from deep in Celery
    sys.stderr.write("PROMPTBATCH_REDIS_URL is not set: point it at the service's Redis "
                     f"(`promptbatch up` prints it and writes it to {_settings.data_dir}/up.env)"
                     "\n")
    raise SystemExit(2)
app = create_app(_settings)
