"""URL policy: a table of URLs and the refusal each must get; no name is resolved for real."""

import socket

import pytest

from components.data.url_policy import REFUSAL_REASONS, UrlPolicyConfig, check_url

pytestmark = pytest.mark.unit

NO_DNS = UrlPolicyConfig(resolve_hostnames=False)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://8.8.8.8/a.jpg", None),
        ("HTTPS://8.8.8.8:8443/a.jpg?x=1", None),
        ("https://[2606:4700:4700::1111]/a.jpg", None),
        ("http://images.example.com/a.jpg", None),
        ("ftp://8.8.8.8/a.jpg", "scheme_not_allowed"),
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("javascript:alert(1)", "scheme_not_allowed"),
        ("", "malformed_url"),
        ("not a url", "malformed_url"),
        ("/relative/path.jpg", "malformed_url"),
        ("http://", "malformed_url"),
        ("http://[::1/a.jpg", "malformed_url"),
        ("http://8.8.8.8:99999/a.jpg", "malformed_url"),
        ("http://user:secret@8.8.8.8/a.jpg", "malformed_url"),
        ("http://%31%32%37.0.0.1/a.jpg", "malformed_url"),
        ("http://8.8.8.8\\@evil.example/a.jpg", "malformed_url"),
        ("http://127.0.0.1/a.jpg", "loopback_address"),
        ("http://127.1/a.jpg", "loopback_address"),
        ("http://2130706433/a.jpg", "loopback_address"),
        ("http://0x7f.0.0.1/a.jpg", "loopback_address"),
        ("http://0.0.0.0:8080/a.jpg", "loopback_address"),
        ("http://[::1]/a.jpg", "loopback_address"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "loopback_address"),
        ("http://localhost:8080/a.jpg", "loopback_address"),
        ("http://LocalHost./a.jpg", "loopback_address"),
        ("http://api.localhost/a.jpg", "loopback_address"),
        ("http://10.1.2.3/a.jpg", "private_address"),
        ("http://172.16.0.1/a.jpg", "private_address"),
        ("http://192.168.1.20/a.jpg", "private_address"),
        ("http://100.64.0.1/a.jpg", "private_address"),
        ("http://[fd12:3456::1]/a.jpg", "private_address"),
        ("http://[::ffff:10.0.0.1]/a.jpg", "private_address"),
        ("http://169.254.1.1/a.jpg", "link_local_address"),
        ("http://[fe80::1]/a.jpg", "link_local_address"),
        ("http://169.254.169.254/latest/meta-data/", "metadata_address"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata_address"),
        ("http://[::ffff:169.254.169.254]/", "metadata_address"),
        ("http://[64:ff9b::a9fe:a9fe]/", "metadata_address"),
        ("http://100.100.100.200/latest/meta-data/", "metadata_address"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata_address"),
        ("http://192.0.2.1/a.jpg", "reserved_address"),
        ("http://224.0.0.1/a.jpg", "reserved_address"),
        ("http://240.0.0.1/a.jpg", "reserved_address"),
        ("http://255.255.255.255/a.jpg", "reserved_address"),
    ],
)
def test_url_table(url, expected):
    assert check_url(url, NO_DNS) == expected


def test_every_refusal_is_a_declared_reason():
    urls = ["", "ftp://x/", "http://127.0.0.1/", "http://10.0.0.1/", "http://169.254.9.9/"]
    for url in urls:
        assert check_url(url, NO_DNS) in REFUSAL_REASONS


@pytest.mark.parametrize(
    ("allow_hosts", "url", "expected"),
    [
        (("127.0.0.1",), "http://127.0.0.1:4567/a.jpg", None),
        (("127.0.0.1",), "http://127.0.0.2/a.jpg", "loopback_address"),
        (("10.0.0.0/8",), "http://10.20.30.40/a.jpg", None),
        (("10.0.0.0/8",), "http://192.168.0.1/a.jpg", "private_address"),
        (("fd00::/8",), "http://[fd12::1]/a.jpg", None),
        (("localhost",), "http://localhost:8000/a.jpg", None),
        (("169.254.0.0/16",), "http://169.254.3.4/a.jpg", None),
        (("169.254.0.0/16",), "http://169.254.169.254/", "metadata_address"),
        (("metadata.google.internal",), "http://metadata.google.internal/", "metadata_address"),
    ],
)
def test_allow_hosts(allow_hosts, url, expected):
    config = UrlPolicyConfig(allow_hosts=allow_hosts, resolve_hostnames=False)
    assert check_url(url, config) == expected


def _fake_getaddrinfo(answers):
    def getaddrinfo(host, *_args, **_kwargs):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in answers[host]]

    return getaddrinfo


def test_resolution_checks_every_address(monkeypatch):
    answers = {
        "public.example": ["8.8.8.8", "8.8.4.4"],
        "mixed.example": ["8.8.8.8", "10.0.0.7"],
        "rebind.example": ["169.254.169.254"],
    }
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo(answers))
    config = UrlPolicyConfig()
    assert check_url("http://public.example/a.jpg", config) is None
    assert check_url("http://mixed.example/a.jpg", config) == "private_address"
    assert check_url("http://rebind.example/a.jpg", config) == "metadata_address"
    assert check_url("http://nowhere.example/a.jpg", config) == "unresolvable_host"


def test_allowlisted_name_is_not_resolved(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo({}))
    config = UrlPolicyConfig(allow_hosts=("images.internal",))
    assert check_url("http://images.internal/a.jpg", config) is None
    assert check_url("http://other.internal/a.jpg", config) == "unresolvable_host"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"allowed_schemes": ()}, "allowed_schemes"),
        ({"allowed_schemes": ("HTTP",)}, "allowed_schemes"),
        ({"allow_hosts": ("bad host!",)}, "allow_hosts"),
        ({"allow_hosts": ("",)}, "allow_hosts"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UrlPolicyConfig(**kwargs)
