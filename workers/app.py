"""The module ``celery -A workers.app`` names: the only place a global app is bound.

Settings come from the environment (``PROMPTBATCH_REDIS_URL`` and friends)::

    celery -A workers.app worker -Q pb.critical,pb.high,pb.normal,pb.low,pb.bulk
    celery -A workers.app flower
"""

from config.settings import Settings
from workers.factory import create_app

app = create_app(Settings())
