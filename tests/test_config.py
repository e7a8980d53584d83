import pytest

from wattkeeper.config import ConfigError, load_config, parse_listen


def write(tmp_path, text):
    p = tmp_path / "wattkeeper.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    cfg = load_config(None, environ={})
    assert cfg.controller.interval_s == 5.0
    assert cfg.metrics.listen == "127.0.0.1:9847"
    assert cfg.store.url is None


def test_file_values_and_units(tmp_path):
    p = write(tmp_path, '[controller]\ninterval_s = "10s"\n[agent.host]\nidle_w = "1.5kW"\n')
    cfg = load_config(p, environ={})
    assert cfg.controller.interval_s == 10.0
    assert cfg.agent.host.idle_w == 1500.0


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, "[controller]\nintervl_s = 5\n")
    with pytest.raises(ConfigError, match=r"controller\.intervl_s: unknown key"):
        load_config(p, environ={})


def test_wrong_value_names_key_and_expectation(tmp_path):
    p = write(tmp_path, '[controller]\nmargin_ratio = "lots"\n')
    with pytest.raises(ConfigError, match=r"controller\.margin_ratio: .*number"):
        load_config(p, environ={})


def test_bad_listen_address(tmp_path):
    p = write(tmp_path, '[metrics]\nlisten = "localhost"\n')
    with pytest.raises(ConfigError, match=r"metrics\.listen: invalid listen address"):
        load_config(p, environ={})


@pytest.mark.parametrize("listen", ["[]:9847", ":9847", "::1:9847", "[::1]]:9847", "a b:9847"])
def test_an_empty_or_malformed_host_is_refused_not_every_interface(listen):
    """'[]:9847' used to bind every interface: only 0.0.0.0 or [::] says that."""
    with pytest.raises(ConfigError, match="invalid listen address"):
        load_config(None, environ={"WATTKEEPER_METRICS__LISTEN": listen})
    assert parse_listen("[::1]:9847") == ("::1", 9847)
    assert parse_listen("0.0.0.0:9847") == ("0.0.0.0", 9847)


@pytest.mark.parametrize(
    ("key", "value"),
    [("WATTKEEPER_AGENT__INTERVAL_S", "100ms"), ("WATTKEEPER_CONTROLLER__INTERVAL_S", "1s")],
)
def test_the_shortest_periods_that_make_sense_are_accepted_and_shorter_refused(key, value):
    load_config(None, environ={key: value, "WATTKEEPER_CONTROLLER__LEASE_S": "1h"})
    with pytest.raises(ConfigError, match="greater than or equal"):
        load_config(None, environ={key: "0.0001s", "WATTKEEPER_CONTROLLER__LEASE_S": "1h"})


def test_environment_overrides_file(tmp_path):
    p = write(tmp_path, '[store]\nurl = "sqlite:////tmp/a.db"\n')
    cfg = load_config(p, environ={"WATTKEEPER_STORE__URL": "sqlite:////tmp/b.db"})
    assert cfg.store.url == "sqlite:////tmp/b.db"


def test_unknown_environment_key_is_refused():
    with pytest.raises(ConfigError, match=r"store\.ulr: unknown key"):
        load_config(None, environ={"WATTKEEPER_STORE__ULR": "x"})


def test_config_path_from_environment(tmp_path):
    p = write(tmp_path, '[agent]\nnode = "gpu-17"\n')
    assert load_config(None, environ={"WATTKEEPER_CONFIG": str(p)}).agent.node == "gpu-17"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[controller\n"), environ={})


def test_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).parent.parent / "wattkeeper.example.toml"
    cfg = load_config(example, environ={})
    assert cfg.agent.endpoints, "the example should show an endpoint"


def test_lease_shorter_than_the_control_period_is_refused():
    with pytest.raises(ConfigError, match=r"controller\.lease_s \(2 s\) must be at least"):
        load_config(None, environ={"WATTKEEPER_CONTROLLER__LEASE_S": "2s"})
    with pytest.raises(ConfigError, match=r"stale_after_s"):
        load_config(None, environ={"WATTKEEPER_CONTROLLER__STALE_AFTER_S": "1s"})
