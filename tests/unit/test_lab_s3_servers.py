"""The lab's two S3 servers as the cluster and e2e layers use them (pure, no server started):
which servers a run names and which tests `make test` leaves out (tests/s3_selection.py),
where clients reach SeaweedFS and what its certificate names, and what a job on it carries."""
from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509

import s3_selection
from e2e.phoenix_e2e import E2ETarget, S3Target, sample_job
from phoenix_lab.certs import ensure_ca, ensure_server_cert, subject_alt_names
from phoenix_lab.s3 import SERVER_NAMES, seaweed_cert_ips, seaweed_endpoint, servers_wanted

pytestmark = pytest.mark.unit

HOST = "10.245.255.1"  # a lab's host address (network.LabNetwork(1).host_ip)


def test_every_server_by_default_versitygw_first_and_a_list_picks_in_its_order():
    assert servers_wanted(None) == servers_wanted(" ") == ["versitygw", "seaweedfs"]
    assert list(SERVER_NAMES) == ["versitygw", "seaweedfs"]
    assert servers_wanted("seaweedfs") == ["seaweedfs"]
    assert servers_wanted(" seaweedfs, versitygw,seaweedfs") == ["seaweedfs", "versitygw"]


@pytest.mark.parametrize("spec", ["minio", "versitygw,minio", ","])
def test_an_unknown_or_empty_server_list_is_an_error_naming_the_choices(spec):
    with pytest.raises(ValueError, match="versitygw, seaweedfs"):
        servers_wanted(spec)


def _out(params, markers=(), **env) -> bool:
    return s3_selection.deselected(params, set(markers), env)


def test_make_test_runs_cluster_and_e2e_tests_on_the_first_server_only():
    for param in s3_selection.LAB_PARAMS:
        assert not _out({param: "versitygw"}, ["slow"])
        assert _out({param: "seaweedfs"})
        assert _out({param: "seaweedfs"}, ["slow", "e2e"])


def test_a_marked_test_or_the_env_var_runs_them_on_every_server():
    assert not _out({"e2e": "seaweedfs"}, [s3_selection.MARKER])
    assert not _out({"lab_s3_server": "seaweedfs"}, PHOENIX_LAB_S3_ON_ALL="1")
    assert not _out({"e2e": "seaweedfs"}, PHOENIX_LAB_S3_ON_ALL="true")
    # the storage layer's switch is another one
    assert _out({"e2e": "seaweedfs"}, PHOENIX_S3_SLOW_ON_ALL="1")


def test_slow_storage_tests_keep_their_own_rule():
    assert _out({"s3_server": "seaweedfs"}, ["slow"])
    assert not _out({"s3_server": "seaweedfs"}, ["slow"], PHOENIX_S3_SLOW_ON_ALL="1")
    assert not _out({"s3_server": "seaweedfs"})  # fast storage tests run on both
    # the cluster and e2e switches are not the storage layer's
    assert _out({"s3_server": "seaweedfs"}, ["slow", s3_selection.MARKER],
                PHOENIX_LAB_S3_ON_ALL="1")


def test_the_full_tier_runs_only_when_asked_on_any_server_and_layer():
    for params in ({}, {"s3_server": "versitygw"}, {"e2e": "versitygw"}):
        assert _out(params, [s3_selection.FULL])
        assert not _out(params, [s3_selection.FULL], PHOENIX_FULL="1")
    # the tier does not widen the server rule: a full e2e test on the second server needs both
    assert _out({"e2e": "seaweedfs"}, [s3_selection.FULL], PHOENIX_FULL="1")
    assert not _out({"e2e": "seaweedfs"}, [s3_selection.FULL], PHOENIX_FULL="1",
                    PHOENIX_LAB_S3_ON_ALL="1")


def test_the_first_server_is_whichever_the_list_names_first():
    assert _out({"e2e": "versitygw"}, PHOENIX_S3_SERVERS="seaweedfs,versitygw")
    assert not _out({"e2e": "seaweedfs"}, PHOENIX_S3_SERVERS="seaweedfs,versitygw")
    assert not _out({"e2e": "seaweedfs"}, PHOENIX_S3_SERVERS="seaweedfs")


def test_an_external_cluster_is_one_e2e_parameter_never_left_out():
    assert s3_selection.e2e_params({}) == ["versitygw", "seaweedfs"]
    assert s3_selection.e2e_params({"PHOENIX_E2E_KUBECONFIG": "/k"}) == [s3_selection.EXTERNAL]
    assert not _out({"e2e": s3_selection.EXTERNAL})


def test_seaweedfs_on_loopback_is_reached_by_name_and_on_a_lab_by_its_address():
    local = seaweed_endpoint("127.0.0.1", 8333, "a", "s", "/ca.crt")
    assert local.url == "https://localhost:8333" and local.virtual_url == "https://s3.localhost:8333"
    lab = seaweed_endpoint(HOST, 8333, "phxkey", "sekrit-value", "/ca.crt")
    assert lab.url == f"https://{HOST}:8333" and lab.virtual_url is None
    assert lab.name == "seaweedfs" and lab.ca_bundle == "/ca.crt"
    assert lab.env()["AWS_CA_BUNDLE"] == "/ca.crt" and "sekrit" not in repr(lab)
    assert seaweed_cert_ips("127.0.0.1") == () and seaweed_cert_ips(HOST) == (HOST,)


def test_the_certificate_names_the_host_address_and_is_signed_by_the_lab_ca(tmp_path):
    pki = ensure_server_cert(ensure_ca(tmp_path), "s3", ("localhost", "s3.localhost"),
                             server_ips=seaweed_cert_ips(HOST))
    assert pki.cert("s3").name == "s3.crt" and pki.key("s3").name == "s3.key"  # what weed takes
    dns, ips = subject_alt_names(pki.cert("s3"))
    assert dns == {"localhost", "s3.localhost"} and ips == {"127.0.0.1", HOST}
    cert = x509.load_pem_x509_certificate(pki.cert("s3").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    assert all(ipaddress.ip_address(ip) for ip in ips)


def test_a_kept_certificate_is_issued_again_only_when_it_lacks_a_wanted_name(tmp_path):
    pki = ensure_server_cert(ensure_ca(tmp_path), "s3", ("localhost",))
    first = pki.cert("s3").read_bytes()
    assert ensure_server_cert(pki, "s3", ("localhost",)).cert("s3").read_bytes() == first
    ensure_server_cert(pki, "s3", ("localhost",), server_ips=(HOST,))
    assert pki.cert("s3").read_bytes() != first
    assert HOST in subject_alt_names(pki.cert("s3"))[1]
    again = pki.cert("s3").read_bytes()
    ensure_server_cert(pki, "s3", ("localhost",), server_ips=(HOST,))
    assert pki.cert("s3").read_bytes() == again


def _target(s3: S3Target) -> E2ETarget:
    return E2ETarget(kubeconfig="/k", namespace="ns", operator_namespace="op",
                     operator_release="rel", s3=s3, trainer_image="t:1",
                     trainer_command=["python", "x.py"])


def test_a_job_on_a_private_ca_endpoint_names_its_ca_configmap_and_others_do_not():
    plain = S3Target("http://h:1", "http://h:1", "a", "s", name="versitygw")
    tls = S3Target(f"https://{HOST}:2", f"https://{HOST}:2", "a", "s", name="seaweedfs",
                   ca_bundle="/ca.crt", ca_configmap="phoenix-lab-ca")
    assert "caBundle" not in sample_job(_target(plain), "j", "b")["spec"]["checkpoint"]
    checkpoint = sample_job(_target(tls), "j", "b")["spec"]["checkpoint"]
    assert checkpoint["caBundle"] == {"configMap": "phoenix-lab-ca"}
    assert checkpoint["endpoint"] == f"https://{HOST}:2"
