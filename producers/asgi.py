"""The ASGI application uvicorn serves (``promptbatch api``); settings from the environment."""

from producers.api import create_app

app = create_app()
