#!/usr/bin/python3
"""TLS on every listener, checked with real TLS clients: Python grpcio (Debian's) for the
generation and admin APIs, curl for /metrics, against certificates of a test CA that openssl
makes here. Covers plain TLS, mutual TLS with --tls_client_ca, an admin listener off loopback
(allowed only with a token and TLS), and certificate rotation without a restart. Prints
'N passed, N failed'.

Usage: tls_test.py ADAPTERD_BINARY FIXTURES_DIR PROTO_DIR
"""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks, load_stubs  # noqa: E402


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d, name):
    key, crt = os.path.join(d, name + ".key"), os.path.join(d, name + ".crt")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
            "-days", "2", "-subj", "/CN=" + name)
    return key, crt


def make_cert(d, name, ca, server):
    """A certificate for `name` signed by `ca` (key, crt); server ones name 127.0.0.1."""
    key, csr, crt = (os.path.join(d, name + ext) for ext in (".key", ".csr", ".crt"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", "/CN=" + name)
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        if server:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        else:
            f.write("extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
            "-out", crt, "-days", "2", "-extfile", ext)
    return key, crt


def curl_metrics(port, ca, cert=None):
    cmd = ["curl", "-sS", "--max-time", "10", "--cacert", ca]
    if cert:
        cmd += ["--cert", cert[1], "--key", cert[0]]
    r = subprocess.run(cmd + [f"https://127.0.0.1:{port}/metrics"], capture_output=True, text=True)
    return r.returncode, r.stdout


def main():
    binary, fixtures, proto_dir = sys.argv[1:4]
    stubs = load_stubs(proto_dir)
    grpc, gen_pb, gen_grpc = stubs.grpc, stubs.generation_pb2, stubs.generation_pb2_grpc
    admin_pb, admin_grpc = stubs.admin_pb2, stubs.admin_pb2_grpc
    d = tempfile.mkdtemp(prefix="adapterd_tls_")
    ca = make_ca(d, "test-ca")
    server_cert = make_cert(d, "server", ca, server=True)
    client_cert = make_cert(d, "client", ca, server=False)
    other_ca = make_ca(d, "other-ca")
    stranger = make_cert(d, "stranger", other_ca, server=False)
    ca_pem = open(ca[1], "rb").read()
    token = os.path.join(d, "token")
    with open(token, "w") as f:
        f.write("tls-test-admin-token\n")
    os.chmod(token, 0o600)
    check = Checks()
    request = gen_pb.GenerateRequest(text="Hello over TLS", max_new_tokens=4, ignore_eos=True)

    def creds(client=None, root=ca_pem):
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.ssl_channel_credentials(root_certificates=root,
                                            private_key=open(client[0], "rb").read(),
                                            certificate_chain=open(client[1], "rb").read())

    def generate(addr, credentials):
        channel = (grpc.secure_channel(addr, credentials) if credentials is not None
                   else grpc.insecure_channel(addr))
        try:
            return gen_grpc.GenerationStub(channel).Generate(request, timeout=15), None
        except grpc.RpcError as e:
            return None, e.code()
        finally:
            channel.close()

    # TLS, with the admin API on every interface (it has a token and TLS, so it may).
    server = Adapterd(binary, fixtures, [
        "--tls_cert=" + server_cert[1], "--tls_key=" + server_cert[0],
        "--admin_listen=0.0.0.0:0", "--admin_token_file=" + token, "--tls_reload_interval_s=1"])
    try:
        resp, code = generate(server.addr, creds())
        check("tls generate", resp is not None and len(resp.token_ids) == 4, str(code))
        resp, code = generate(server.addr, None)
        check("plaintext refused", resp is None and code == grpc.StatusCode.UNAVAILABLE, str(code))
        resp, code = generate(server.addr, creds(root=open(other_ca[1], "rb").read()))
        check("unknown CA refused", resp is None, str(code))
        channel = grpc.secure_channel(server.admin_addr, creds())
        admin = admin_grpc.AdminStub(channel)
        listed = admin.ListAdapters(admin_pb.ListAdaptersRequest(), timeout=10,
                                    metadata=[("authorization", "Bearer tls-test-admin-token")])
        check("admin over tls", listed is not None)
        try:
            admin.ListAdapters(admin_pb.ListAdaptersRequest(), timeout=10)
            check("admin token still needed", False)
        except grpc.RpcError as e:
            check("admin token still needed", e.code() == grpc.StatusCode.UNAUTHENTICATED)
        channel.close()
        rc, body = curl_metrics(server.metrics_port, ca[1])
        check("curl https metrics", rc == 0 and "adapterd_requests_total" in body, f"rc={rc}")
        ctl = os.path.join(os.path.dirname(binary), "adapterctl")
        r = subprocess.run([ctl, "--addr", server.addr, "--tls_ca", ca[1], "generate", "--prompt",
                            "Hello", "--max_new_tokens", "3", "--json"], capture_output=True, text=True)
        check("adapterctl over tls", r.returncode == 0 and "token_ids" in r.stdout, r.stderr)
        r = subprocess.run([ctl, "--admin_addr", server.admin_addr, "--tls_ca", ca[1],
                            "--admin_token_file", token, "list"], capture_output=True, text=True)
        check("adapterctl admin over tls", r.returncode == 0, r.stderr)
        plain = subprocess.run(["curl", "-sS", "--max-time", "5",
                                f"http://127.0.0.1:{server.metrics_port}/metrics"],
                               capture_output=True, text=True)
        check("curl plaintext metrics refused", "adapterd_requests_total" not in plain.stdout)

        # Rotation: new files from another CA are picked up without a restart.
        rotated = make_cert(d, "rotated", other_ca, server=True)
        os.replace(rotated[0], server_cert[0])
        os.replace(rotated[1], server_cert[1])
        ok = False
        for _ in range(100):
            resp, _ = generate(server.addr, creds(root=open(other_ca[1], "rb").read()))
            if resp is not None:
                ok = True
                break
            time.sleep(0.1)
        check("rotated certificate served", ok)
    finally:
        check("tls clean exit", server.stop() == 0)

    # Mutual TLS: only clients with a certificate from the client CA get in.
    server_cert = make_cert(d, "server2", ca, server=True)
    server = Adapterd(binary, fixtures, [
        "--tls_cert=" + server_cert[1], "--tls_key=" + server_cert[0], "--tls_client_ca=" + ca[1]])
    try:
        resp, code = generate(server.addr, creds(client_cert))
        check("mtls with client cert", resp is not None, str(code))
        resp, code = generate(server.addr, creds())
        check("mtls without client cert refused", resp is None, str(code))
        resp, code = generate(server.addr, creds(stranger))
        check("mtls foreign client cert refused", resp is None, str(code))
        rc, body = curl_metrics(server.metrics_port, ca[1], client_cert)
        check("curl mtls metrics", rc == 0 and "adapterd_requests_total" in body, f"rc={rc}")
        ctl = os.path.join(os.path.dirname(binary), "adapterctl")
        r = subprocess.run([ctl, "--addr", server.addr, "--tls_ca", ca[1], "--tls_cert",
                            client_cert[1], "--tls_key", client_cert[0], "health"],
                           capture_output=True, text=True)
        check("adapterctl mtls", r.returncode == 0 and "SERVING" in r.stdout, r.stdout + r.stderr)
        rc, body = curl_metrics(server.metrics_port, ca[1])
        check("curl mtls metrics without cert refused", rc != 0 or "adapterd" not in body)
    finally:
        check("mtls clean exit", server.stop() == 0)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
