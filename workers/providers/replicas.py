"""The replicas of one HTTP provider: one provider per address, under the provider's name.

The scheduler picks a replica for each batch (``scheduler.routing``) and the task names
the order to try them in; the retry layer (``workers.retry``) sends the batch to the
first that is not cooling down and moves on to the next when one fails."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from workers.providers.base import Provider, ProviderReply, ProviderRequest

if TYPE_CHECKING:
    from jobs.streams import Sink


class Replicas:
    """Several addresses of one provider; used as ``members[i]`` by the retry layer, and as
    the first member where a replica is not named."""

    def __init__(self, members: Sequence[Provider], urls: Sequence[str]) -> None:
        if len(members) != len(urls) or not members:
            raise ValueError("one provider per replica address")
        self.members = list(members)
        self.urls = list(urls)
        first = self.members[0]
        self.name = first.name
        self.probe_first = first.probe_first
        self.streams = first.streams
        self._sink: Sink | None = None

    @property
    def sink(self) -> Sink | None:
        return self._sink

    @sink.setter
    def sink(self, value: Sink | None) -> None:
        self._sink = value
        for member in self.members:
            member.sink = value

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        return self.members[0].complete(requests)

    def close(self) -> None:
        for member in self.members:
            member.close()
