"""AMQP 1.0 addressing policy, as pure functions: which address a key gets, how
messages are sent, and what a broker's disposition means (no I/O, no state).

Addresses. A key's address comes from ``settings.address_template``
(``{key}`` and ``{exchange}`` are filled in); when that is empty it is chosen
from the ``product`` property of the broker's ``open`` frame:

- RabbitMQ: ``/exchange/{exchange}/{key}`` (address format v1; RabbitMQ 4.x
  still accepts it while the ``amqp_address_v1`` deprecated feature is
  permitted, its default).
- ActiveMQ Classic / Artemis: ``topic://triows.{key}`` (ActiveMQ's AMQP
  documentation: prefix an address with ``topic://`` for a topic; Artemis
  honours the prefix when its acceptor sets ``multicastPrefix=topic://``).
- any other broker: ``{key}``.

Sending. With a template ``<target>/{key}`` and no ``ANONYMOUS-RELAY``
capability offered (RabbitMQ 3.x), the sender link targets ``<target>`` and
each message carries its key in ``subject`` (RabbitMQ: the routing key). A
broker that offers ``ANONYMOUS-RELAY`` gets a sender with a null target and
each message's ``to`` set to the key's address. A template that fits neither
is a configuration error (:class:`~backends.supervisor.BrokerRejected`).

Outcomes. ``accepted`` -> ``ACCEPTED``, or ``ROUTED`` where accepted means
"routed to a queue" (RabbitMQ 4.x); ``released`` -> ``UNROUTED`` (RabbitMQ
4.x releases an unroutable message; the spec: "not and will not be acted
upon"); ``modified`` with ``undeliverable-here`` -> ``UNROUTED``; ``rejected``
or any other modified -> :class:`BrokerUnavailable`. Measured on RabbitMQ
3.10.8: a message to ``/exchange/triows`` with a key nobody holds is settled
``accepted``, exactly like a routed one, so on 3.x every publish is
``ACCEPTED`` and ``/send`` answers 202 ``accepted`` for an offline user.
"""

from __future__ import annotations

from dataclasses import dataclass

from proton import Delivery, symbol

from triows.backend import BrokerUnavailable, Outcome
from triows.backends.broker_url import BrokerAddress, parse_broker_url, parse_broker_urls
from triows.backends.supervisor import BrokerRejected
from triows.settings import Settings

SCHEMES = {"amqp": (5672, False), "amqps": (5671, True)}
ANONYMOUS_RELAY = symbol("ANONYMOUS-RELAY")
RABBITMQ_TEMPLATE = "/exchange/{exchange}/{key}"
ACTIVEMQ_TEMPLATE = "topic://triows.{key}"
GENERIC_TEMPLATE = "{key}"


def parse_url(url: str) -> BrokerAddress:
    """``amqp[s]://[user:password@]host[:port][/vhost]``; ``SettingsError`` if malformed."""
    return parse_broker_url(url, SCHEMES)


def parse_urls(urls: str) -> list[BrokerAddress]:
    """Every URL of a comma-separated ``TRIOWS_BROKER_URL``; ``SettingsError`` names a bad one."""
    return parse_broker_urls(urls, SCHEMES)


@dataclass(frozen=True)
class Addressing:
    """How keys become AMQP addresses on one broker, and how messages are sent."""

    family: str
    template: str
    sender_target: str | None  # None: anonymous relay, each message names its address
    confirms_routing: bool  # ``accepted`` means "routed to at least one queue"

    def address(self, key: str) -> str:
        return self.template.replace("{key}", key)

    @property
    def queue_exchange(self) -> str | None:
        """The exchange each key's own queue is bound to, where the backend keeps queues
        that outlive connections (RabbitMQ, ``/exchange/<name>/{key}``); else None."""
        parts = self.template.split("/")
        if self.family != "rabbitmq" or len(parts) != 4 or parts[:2] != ["", "exchange"]:
            return None
        return parts[2] if parts[2] and parts[3] == "{key}" else None

    @property
    def rabbitmq_exchange(self) -> str | None:
        """The RabbitMQ exchange the addresses route through, if it must be declared."""
        if self.family != "rabbitmq" or not self.template.startswith("/exchange/"):
            return None
        exchange = self.template.split("/")[2]
        return exchange if exchange and not exchange.startswith("amq.") else None


def choose_addressing(
    settings: Settings, properties: dict[object, object] | None, capabilities: object
) -> Addressing:
    """Pick the addresses for the broker that sent these ``open`` properties."""
    properties = properties or {}
    product = str(properties.get(symbol("product"), ""))
    version = str(properties.get(symbol("version"), ""))
    if product.lower() == "rabbitmq":
        family, default = "rabbitmq", RABBITMQ_TEMPLATE
    elif "activemq" in product.lower():
        family, default = "activemq", ACTIVEMQ_TEMPLATE
    else:
        family, default = "generic", GENERIC_TEMPLATE
    template = (settings.address_template or default).replace("{exchange}", settings.exchange)
    relay = ANONYMOUS_RELAY in (capabilities or [])  # type: ignore[operator]
    prefix, _, rest = template.rpartition("/")
    # RabbitMQ 3.x's convention: target ``/exchange/X`` takes the routing key
    # from each message's subject. Preferred on RabbitMQ even where 4.x offers
    # the relay, whose ``to`` addresses must be in its v2 format.
    subject_routing = rest == "{key}" and prefix != ""
    if subject_routing and (family == "rabbitmq" or not relay):
        sender_target: str | None = prefix
    elif relay:
        sender_target = None
    else:
        raise BrokerRejected(
            "configuration",
            f"broker {product or 'unknown'!r} offers no anonymous relay and the address "
            f"template {template!r} does not end in '/{{key}}'; set TRIOWS_ADDRESS_TEMPLATE",
            template=template,
        )
    major = version.split(".", 1)[0]
    confirms_routing = family == "rabbitmq" and major.isdigit() and int(major) >= 4
    return Addressing(family, template, sender_target, confirms_routing)


def outcome(
    state: int | None, undeliverable_here: bool, condition: str, addressing: Addressing
) -> Outcome:
    """What a publish's remote delivery ``state`` means (None: the connection ended)."""
    if state is None:
        raise BrokerUnavailable("the broker connection ended before the message's outcome came")
    if state == Delivery.ACCEPTED:
        return Outcome.ROUTED if addressing.confirms_routing else Outcome.ACCEPTED
    if state == Delivery.RELEASED:
        return Outcome.UNROUTED
    if state == Delivery.MODIFIED and undeliverable_here:
        return Outcome.UNROUTED
    raise BrokerUnavailable(
        f"the broker did not take the message (outcome {state}): {condition or 'no reason'}"
    )
