"""How the AMQP 1.0 backend names keys on each broker family, and reads its URL (no broker)."""

from __future__ import annotations

import pytest
from proton import symbol

from triows.backends.amqp10 import check_settings
from triows.backends.amqp10_addressing import ANONYMOUS_RELAY, choose_addressing, parse_url
from triows.backends.supervisor import BrokerRejected
from triows.settings import Settings, SettingsError


def open_properties(product: str, version: str = "1.0.0") -> dict[object, object]:
    return {symbol("product"): product, symbol("version"): version}


def test_rabbitmq_3_gets_exchange_addresses_with_the_key_as_subject() -> None:
    addressing = choose_addressing(
        Settings(exchange="chat"), open_properties("RabbitMQ", "3.10.8"), None
    )
    assert addressing.family == "rabbitmq"
    assert addressing.address("user.bob") == "/exchange/chat/user.bob"
    assert addressing.sender_target == "/exchange/chat"
    assert not addressing.confirms_routing


def test_rabbitmq_4_accepted_means_routed() -> None:
    addressing = choose_addressing(
        Settings(), open_properties("RabbitMQ", "4.1.0"), [ANONYMOUS_RELAY]
    )
    # v1 addresses with subject routing, even though 4.x offers the relay.
    assert addressing.sender_target == "/exchange/triows"
    assert addressing.confirms_routing


@pytest.mark.parametrize("product", ["ActiveMQ", "apache-activemq-artemis"])
def test_activemq_gets_topic_addresses_through_the_anonymous_relay(product: str) -> None:
    addressing = choose_addressing(Settings(), open_properties(product), [ANONYMOUS_RELAY])
    assert addressing.family == "activemq"
    assert addressing.address("user.bob") == "topic://triows.user.bob"
    assert addressing.sender_target is None


def test_an_unknown_broker_gets_the_bare_key() -> None:
    addressing = choose_addressing(Settings(), open_properties("Qpid Broker-J"), [ANONYMOUS_RELAY])
    assert (addressing.family, addressing.address("user.bob")) == ("generic", "user.bob")
    assert addressing.sender_target is None


def test_the_template_setting_wins_over_the_broker_default() -> None:
    settings = Settings(address_template="/exchange/{exchange}.v2/{key}", exchange="chat")
    addressing = choose_addressing(settings, open_properties("RabbitMQ", "3.10.8"), None)
    assert addressing.address("user.bob") == "/exchange/chat.v2/user.bob"
    assert addressing.sender_target == "/exchange/chat.v2"


def test_a_broker_without_relay_and_a_template_without_a_target_is_refused() -> None:
    # A configuration error: reported once and retried slowly, not a lost link.
    with pytest.raises(BrokerRejected, match="anonymous relay"):
        choose_addressing(Settings(), open_properties("Qpid Broker-J"), None)


def test_broker_url_parts_are_read_with_defaults() -> None:
    target = parse_url("amqps://us%40r:p%3Ass@broker.example/tenant")
    assert (target.host, target.port, target.tls) == ("broker.example", 5671, True)
    assert (target.user, target.password, target.vhost) == ("us@r", "p:ss", "tenant")
    plain = parse_url("amqp://127.0.0.1")
    assert (plain.port, plain.tls, plain.user, plain.vhost) == (5672, False, None, "/")


def test_a_broker_url_of_another_scheme_is_refused() -> None:
    settings = Settings(backend="amqp10", broker_url="stomp://127.0.0.1:61613")
    with pytest.raises(SettingsError, match="amqp://"):
        check_settings(settings)
