// Starts the real adapterd binary (`serve`, every listener on port 0) as a child process for
// end-to-end tests, waits until it has written its port file, and stops it with a signal.
#pragma once

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "adapterd/v1/admin.grpc.pb.h"
#include "adapterd/v1/generation.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace adapterd::testing {

class ServerProcess {
 public:
  // Starts adapterd serve on `model` with the fixture adapters as adapter root.
  explicit ServerProcess(const std::string& model, std::vector<std::string> extra_flags = {}) {
    dir_ = TempDir("server_" + std::to_string(counter_++));
    port_file_ = dir_ + "/ports.json";
    log_ = dir_ + "/server.log";
    std::vector<std::string> args = {
        AdapterdBinary(), "serve", "--model_dir=" + model,
        "--adapter_root=" + Fixture("adapters"), "--listen=127.0.0.1:0",
        "--admin_listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
        "--port_file=" + port_file_, "--log_level=info"};
    args.insert(args.end(), extra_flags.begin(), extra_flags.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      FILE* log = std::fopen(log_.c_str(), "w");
      ::dup2(fileno(log), 2);
      ::dup2(fileno(log), 1);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    // Wait (bounded) for the server to announce its ports.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    struct stat st {};
    while (::stat(port_file_.c_str(), &st) != 0) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        ADD_FAILURE() << "adapterd exited before serving; log:\n" << ReadBytes(log_);
        return;
      }
      if (std::chrono::steady_clock::now() > give_up) {
        ADD_FAILURE() << "adapterd did not start in 60 s; log:\n" << ReadBytes(log_);
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    auto ports = ReadJson(port_file_);
    port_ = ports["listen"];
    admin_port_ = ports["admin"];
    metrics_port_ = ports["metrics"];
    if (ports.contains("http")) http_port_ = ports["http"];
  }

  ~ServerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  bool ok() const { return pid_ > 0 && port_ > 0; }
  int port() const { return port_; }
  int admin_port() const { return admin_port_; }
  int metrics_port() const { return metrics_port_; }
  int http_port() const { return http_port_; }
  std::string log() const { return ReadBytes(log_); }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string admin_address() const { return "127.0.0.1:" + std::to_string(admin_port_); }

  std::unique_ptr<adapterd::v1::Generation::Stub> Generation() const {
    return adapterd::v1::Generation::NewStub(
        grpc::CreateChannel(address(), grpc::InsecureChannelCredentials()));
  }
  std::unique_ptr<adapterd::v1::Admin::Stub> Admin() const {
    return adapterd::v1::Admin::NewStub(
        grpc::CreateChannel(admin_address(), grpc::InsecureChannelCredentials()));
  }

  // Sends `signal` and returns the exit status (or -1 if it did not exit within `seconds`).
  int SignalAndWait(int signal, int seconds) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, signal);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (std::chrono::steady_clock::now() < give_up) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

 private:
  static inline int counter_ = 0;
  std::string dir_, port_file_, log_;
  pid_t pid_ = -1;
  int port_ = 0, admin_port_ = 0, metrics_port_ = 0, http_port_ = 0;
};

// A greedy request for `ids` that ignores EOS.
inline adapterd::v1::GenerateRequest IdsRequest(const std::vector<int32_t>& ids, const std::string& adapter,
                               uint32_t max_new_tokens) {
  adapterd::v1::GenerateRequest r;
  for (int32_t id : ids) r.mutable_token_ids()->add_ids(id);
  r.set_adapter(adapter);
  r.set_max_new_tokens(max_new_tokens);
  r.set_ignore_eos(true);
  return r;
}

inline grpc::Status Generate(const ServerProcess& s, const adapterd::v1::GenerateRequest& req,
                      adapterd::v1::GenerateResponse* resp, int timeout_ms = 60000) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  // The server is listening (it writes its port file after), so a connection attempt that
  // fails is the test machine's noise, not what a test checks: retried within the deadline.
  ctx.set_wait_for_ready(true);
  return s.Generation()->Generate(&ctx, req, resp);
}

}  // namespace adapterd::testing
