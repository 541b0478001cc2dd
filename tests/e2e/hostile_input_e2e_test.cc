// End-to-end attacks on the real adapterd binary: each test is one way a client, an adapter
// author or an unlucky operator broke the server before, and checks that the damage now stays
// with the one request (or is refused by name) while everyone else is served as before.
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <set>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/e2e/server_process.h"

namespace adapterd::testing {
namespace {

namespace v1 = adapterd::v1;
namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

std::string Model() { return Fixture("llama_tok"); }

// Runs adapterd with `args` to completion; returns its exit code and fills `output`.
int RunAdapterd(const std::string& args, std::string* output, int timeout_s = 60) {
  const std::string cmd = "timeout " + std::to_string(timeout_s) + " " + AdapterdBinary() + " " +
                          args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[4096];
  output->clear();
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) output->append(buf, n);
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string Scrape(int port) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(10, 0);
  auto res = client.Get("/metrics");
  return res && res->status == 200 ? res->body : "";
}

// Value of the series `name{labels}` in a text exposition (0 when absent).
double Series(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return 0;
  return std::stod(text.substr(at + series.size() + 2));
}

// Every series (name and labels) of a text exposition.
std::set<std::string> SeriesNames(const std::string& text) {
  std::set<std::string> names;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (!line.empty() && line[0] != '#') names.insert(line.substr(0, line.rfind(' ')));
  }
  return names;
}

v1::GenerateRequest Victim(int i) {
  v1::GenerateRequest r = IdsRequest({1, 450, 4996, static_cast<int32_t>(17354 + i), 1701}, "", 24);
  if (i % 2 == 1) {  // Half sample with a seed: equal outputs then need equal draws too.
    r.set_temperature(0.8f);
    r.set_top_k(40);
    r.set_seed(100 + i);
  }
  return r;
}

TEST(E2eIsolationTest, PoisonedSamplingValuesFailOnlyTheirOwnRequest) {
  ServerProcess server(Model(), {"--max_batch_rows=32"});
  ASSERT_TRUE(server.ok()) << server.log();
  // Each victim alone first.
  std::vector<v1::GenerateResponse> alone(8);
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(Generate(server, Victim(i), &alone[i]).ok());

  // A 24-token prompt: some seen token has a positive score, which 1e-45 turns into +inf.
  std::vector<int32_t> long_prompt;
  for (int i = 0; i < 24; ++i) long_prompt.push_back(300 + 37 * i);
  v1::GenerateRequest overflow = IdsRequest(long_prompt, "", 24);
  overflow.set_temperature(0.8f);
  overflow.set_repetition_penalty(1e-45f);
  v1::GenerateRequest tiny_temperature = IdsRequest(long_prompt, "", 24);
  tiny_temperature.set_temperature(1e-45f);
  tiny_temperature.set_top_k(1);

  for (int round = 0; round < 3; ++round) {
    std::vector<v1::GenerateResponse> together(8);
    std::vector<grpc::Status> statuses(8);
    v1::GenerateResponse poisoned, tiny;
    grpc::Status poisoned_status, tiny_status;
    std::vector<std::thread> threads;
    for (int i = 0; i < 8; ++i) {
      threads.emplace_back([&, i] { statuses[i] = Generate(server, Victim(i), &together[i]); });
    }
    threads.emplace_back([&] { poisoned_status = Generate(server, overflow, &poisoned); });
    threads.emplace_back([&] { tiny_status = Generate(server, tiny_temperature, &tiny); });
    for (auto& t : threads) t.join();
    for (int i = 0; i < 8; ++i) {
      ASSERT_TRUE(statuses[i].ok()) << statuses[i].error_message();
      EXPECT_EQ(together[i].token_ids_size(), 24);
      EXPECT_EQ(std::vector<int32_t>(together[i].token_ids().begin(), together[i].token_ids().end()),
                std::vector<int32_t>(alone[i].token_ids().begin(), alone[i].token_ids().end()))
          << "victim " << i << " round " << round;
    }
    EXPECT_EQ(poisoned_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(poisoned_status.error_message(), HasSubstr("repetition_penalty=1.4013e-45"));
    // No LibTorch internals reach a client.
    EXPECT_THAT(poisoned_status.error_message(), Not(HasSubstr(".so")));
    EXPECT_THAT(poisoned_status.error_message(), Not(HasSubstr("0x")));
    // A near-zero temperature decodes greedily (documented), like temperature 0.
    ASSERT_TRUE(tiny_status.ok()) << tiny_status.error_message();
    v1::GenerateResponse greedy;
    ASSERT_TRUE(Generate(server, IdsRequest(long_prompt, "", 24), &greedy).ok());
    EXPECT_EQ(std::vector<int32_t>(tiny.token_ids().begin(), tiny.token_ids().end()),
              std::vector<int32_t>(greedy.token_ids().begin(), greedy.token_ids().end()));
  }
  const std::string metrics = Scrape(server.metrics_port());
  EXPECT_EQ(Series(metrics, "adapterd_requests_total{adapter=\"\",code=\"INVALID_ARGUMENT\"}"), 3);
}

TEST(E2eAdminRulesTest, BadTokenFilesAndExposedAdminListenersRefuseToStart) {
  const std::string dir = TempDir("admin_rules");
  const std::string base = "serve --model_dir=" + Model() + " --listen=127.0.0.1:0 " +
                           "--metrics_listen=127.0.0.1:0 --admin_listen=127.0.0.1:0 ";
  std::string out;
  WriteFile(dir + "/blank", "  \n\t \n");
  fs::permissions(dir + "/blank", fs::perms::owner_read);
  EXPECT_EQ(RunAdapterd(base + "--admin_token_file=" + dir + "/blank", &out), 2);
  EXPECT_THAT(out, HasSubstr("holds no token"));

  WriteFile(dir + "/open", "a-good-long-token-value\n");
  fs::permissions(dir + "/open", fs::perms::owner_read | fs::perms::others_read);
  EXPECT_EQ(RunAdapterd(base + "--admin_token_file=" + dir + "/open", &out), 2);
  EXPECT_THAT(out, HasSubstr("readable by every user"));

  // Off loopback, the admin API needs a token and TLS.
  EXPECT_EQ(RunAdapterd(base + "--admin_listen=0.0.0.0:0", &out), 2);
  EXPECT_THAT(out, HasSubstr("is not a loopback address"));
  WriteFile(dir + "/good", "a-good-long-token-value\n");
  fs::permissions(dir + "/good", fs::perms::owner_read | fs::perms::group_read);
  EXPECT_EQ(RunAdapterd(base + "--admin_listen=0.0.0.0:0 --admin_token_file=" + dir + "/good", &out),
            2);
  EXPECT_THAT(out, HasSubstr("needs --admin_token_file and TLS"));
  EXPECT_EQ(RunAdapterd(base + "--tls_cert=" + dir + "/good", &out), 2);
  EXPECT_THAT(out, HasSubstr("--tls_cert and --tls_key must be given together"));
}

// A second server pointed at a port the first one holds must not start and share its traffic
// (gRPC and httplib both set SO_REUSEPORT by default, which would allow exactly that).
TEST(E2eAdminRulesTest, ListenersOnPortsInUseRefuseToStart) {
  ServerProcess first(Model(), {"--http_listen=127.0.0.1:0"});
  ASSERT_TRUE(first.ok()) << first.log();
  ASSERT_GT(first.http_port(), 0);
  const auto at = [](int port) { return "127.0.0.1:" + std::to_string(port); };
  const std::map<std::string, int> taken = {{"listen", first.port()},
                                            {"admin_listen", first.admin_port()},
                                            {"metrics_listen", first.metrics_port()},
                                            {"http_listen", first.http_port()}};
  for (const auto& [flag, port] : taken) {
    std::map<std::string, std::string> flags = {{"listen", at(0)},
                                                {"admin_listen", at(0)},
                                                {"metrics_listen", at(0)},
                                                {"http_listen", at(0)}};
    flags[flag] = at(port);
    std::string args = "serve --model_dir=" + Model();
    for (const auto& [name, value] : flags) args += " --" + name + "=" + value;
    std::string out;
    EXPECT_EQ(RunAdapterd(args, &out, 30), 1) << flag << "\n" << out;
    EXPECT_THAT(out, HasSubstr(std::to_string(port))) << flag;
  }
  // The first server still answers.
  v1::GenerateResponse resp;
  EXPECT_TRUE(Generate(first, IdsRequest({1, 2, 3}, "", 2), &resp).ok());
}

// An adapter root holding copies of the fixture adapters, attacked in several ways.
class E2eAdapterFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir("adapter_files");
    root_ = dir_ + "/root";
    fs::create_directories(root_);
    outside_ = dir_ + "/outside";
    fs::create_directories(outside_);
  }
  // Copies fixture adapter `from` to root/`to`.
  std::string Copy(const std::string& from, const std::string& to) {
    fs::copy(Fixture("adapters/" + from), root_ + "/" + to, fs::copy_options::recursive);
    return root_ + "/" + to;
  }
  grpc::Status Load(const ServerProcess& server, const std::string& name, const std::string& path,
                    int timeout_s = 30) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
    v1::LoadAdapterRequest req;
    req.set_name(name);
    req.set_path(path);
    v1::LoadAdapterResponse resp;
    return server.Admin()->LoadAdapter(&ctx, req, &resp);
  }
  std::string dir_, root_, outside_;
};

TEST_F(E2eAdapterFilesTest, FilesSymlinkedOutsideTheRootAreRefused) {
  const std::string a = Copy("lora_qv", "config_link");
  fs::copy_file(a + "/adapter_config.json", outside_ + "/adapter_config.json");
  fs::remove(a + "/adapter_config.json");
  fs::create_symlink(outside_ + "/adapter_config.json", a + "/adapter_config.json");
  const std::string b = Copy("lora_qv", "weights_link");
  fs::copy_file(b + "/adapter_model.safetensors", outside_ + "/adapter_model.safetensors");
  fs::remove(b + "/adapter_model.safetensors");
  fs::create_symlink(outside_ + "/adapter_model.safetensors", b + "/adapter_model.safetensors");
  // A symlink that stays inside the root (as in a Hugging Face cache) is fine.
  const std::string c = Copy("lora_qv", "inside_link");
  fs::rename(c + "/adapter_model.safetensors", root_ + "/blob.safetensors");
  fs::create_symlink(root_ + "/blob.safetensors", c + "/adapter_model.safetensors");

  ServerProcess server(Model(), {"--adapter_root=" + root_});
  ASSERT_TRUE(server.ok()) << server.log();
  for (const std::string path : {"config_link", "weights_link"}) {
    grpc::Status s = Load(server, "x", path);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << path;
    EXPECT_THAT(s.error_message(), HasSubstr("resolves outside the adapter root")) << path;
  }
  EXPECT_TRUE(Load(server, "inside", "inside_link").ok());
}

TEST_F(E2eAdapterFilesTest, FifosAndBacktrackingRegexesAreRefusedAndSigtermStillExits) {
  const std::string a = Copy("lora_qv", "fifo");
  fs::remove(a + "/adapter_config.json");
  ASSERT_EQ(::mkfifo((a + "/adapter_config.json").c_str(), 0644), 0);
  const std::string b = Copy("lora_qv", "fifo_weights");
  fs::remove(b + "/adapter_model.safetensors");
  ASSERT_EQ(::mkfifo((b + "/adapter_model.safetensors").c_str(), 0644), 0);
  // std::regex backtracked on the first for ever; PCRE2 proves it cannot match at once, and
  // runs out of its match budget on the second.
  for (const auto& [name, pattern] : std::map<std::string, std::string>{
           {"regex_x", "(.*.*)*X"}, {"regex_class", "(.*.*)*[^a-z]"}}) {
    const std::string c = Copy("lora_qv", name);
    auto cfg = ReadJson(c + "/adapter_config.json");
    cfg["target_modules"] = pattern;
    WriteFile(c + "/adapter_config.json", cfg.dump());
  }

  ServerProcess server(Model(), {"--adapter_root=" + root_});
  ASSERT_TRUE(server.ok()) << server.log();
  for (const std::string path : {"fifo", "fifo_weights"}) {
    grpc::Status s = Load(server, "x", path, 10);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << path << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("not a regular file")) << path;
  }
  grpc::Status x = Load(server, "x", "regex_x", 10);
  EXPECT_EQ(x.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << x.error_message();
  EXPECT_THAT(x.error_message(), HasSubstr("target_modules matches no module"));
  grpc::Status r = Load(server, "x", "regex_class", 10);
  EXPECT_EQ(r.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.error_message();
  EXPECT_THAT(r.error_message(), HasSubstr("target_modules \"(.*.*)*[^a-z]\" needs more than"));
  // The admin worker is free: a good load still works, and SIGTERM exits at once.
  Copy("lora_qv", "good");
  EXPECT_TRUE(Load(server, "good", "good").ok());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(server.SignalAndWait(SIGTERM, 20), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST_F(E2eAdapterFilesTest, LoadsPastTheirTimeoutAreAbandonedAndLeaveTheTableAlone) {
  Copy("lora_qv", "good");
  // A timeout of 1 µs: the watchdog (normal priority) usually abandons a load (nice 19, ~ms)
  // before it publishes; either way the answer and the table must agree.
  ServerProcess server(Model(), {"--adapter_root=" + root_, "--adapter_load_timeout_s=0.000001"});
  ASSERT_TRUE(server.ok()) << server.log();
  int abandoned = 0;
  for (int i = 0; i < 5; ++i) {
    const std::string name = "a" + std::to_string(i);
    grpc::Status s = Load(server, name, "good");
    grpc::ClientContext ctx;
    v1::ListAdaptersResponse list;
    grpc::Status listed_status = server.Admin()->ListAdapters(&ctx, v1::ListAdaptersRequest(), &list);
    ASSERT_TRUE(listed_status.ok()) << listed_status.error_message() << "\n" << server.log();
    bool listed = false;
    for (const auto& a : list.adapters()) listed |= a.name() == name;
    if (s.ok()) {
      EXPECT_TRUE(listed) << name;
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
      EXPECT_THAT(s.error_message(), HasSubstr("was abandoned; the adapter table is unchanged"));
      EXPECT_FALSE(listed) << name;
      ++abandoned;
    }
  }
  EXPECT_GE(abandoned, 1);
  EXPECT_EQ(server.SignalAndWait(SIGTERM, 20), 0);
}

TEST_F(E2eAdapterFilesTest, NonFiniteAndOverflowingAdaptersAreRefusedByName) {
  // NaN in a lora_B tensor, written by editing the safetensors bytes of a copy.
  const std::string a = Copy("lora_qv", "nan");
  {
    const std::string path = a + "/adapter_model.safetensors";
    std::string bytes = ReadBytes(path);
    uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    auto j = nlohmann::json::parse(bytes.substr(8, header));
    std::string victim;
    for (auto& [name, info] : j.items()) {
      if (name.find("lora_B") != std::string::npos && info["dtype"] == "F32") victim = name;
    }
    ASSERT_FALSE(victim.empty());
    const uint64_t off = 8 + header + j[victim]["data_offsets"][0].get<uint64_t>();
    const float nan = std::nanf("");
    std::memcpy(bytes.data() + off, &nan, 4);
    WriteFile(path, bytes);
  }
  const std::string b = Copy("lora_qv", "huge_alpha");
  auto cfg = ReadJson(b + "/adapter_config.json");
  cfg["lora_alpha"] = 1e308;
  WriteFile(b + "/adapter_config.json", cfg.dump());

  ServerProcess server(Model(), {"--adapter_root=" + root_});
  ASSERT_TRUE(server.ok()) << server.log();
  grpc::Status n = Load(server, "x", "nan");
  EXPECT_EQ(n.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << n.error_message();
  EXPECT_THAT(n.error_message(), HasSubstr("holds NaN or infinite values"));
  grpc::Status h = Load(server, "x", "huge_alpha");
  EXPECT_EQ(h.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << h.error_message();
  EXPECT_THAT(h.error_message(), HasSubstr("is not finite"));
}

TEST(E2eModelFileTest, TruncatingOrRewritingTheServedModelChangesNoAnswer) {
  for (const bool map : {true, false}) {
    const std::string dir = TempDir(map ? "model_mapped" : "model_read");
    const std::string model = dir + "/model";
    fs::copy(Model(), model, fs::copy_options::recursive);
    ServerProcess server(model, {map ? "--mmap=true" : "--mmap=false"});
    ASSERT_TRUE(server.ok()) << server.log();
    const v1::GenerateRequest req = IdsRequest({1, 450, 4996, 17354, 1701}, "", 16);
    v1::GenerateResponse before;
    ASSERT_TRUE(Generate(server, req, &before).ok());
    const std::string weights = model + "/model.safetensors";
    const std::string original = ReadBytes(weights);
    // Rewritten in place with other bytes, then truncated to nothing.
    std::string garbage(original.size(), '\x7f');
    std::memcpy(garbage.data(), original.data(), std::min<size_t>(original.size(), 4096));
    {
      const int fd = ::open(weights.c_str(), O_WRONLY);
      ASSERT_GE(fd, 0);
      ASSERT_EQ(::pwrite(fd, garbage.data() + 4096, garbage.size() - 4096, 4096),
                static_cast<ssize_t>(garbage.size() - 4096));
      ::close(fd);
    }
    v1::GenerateResponse rewritten;
    ASSERT_TRUE(Generate(server, req, &rewritten).ok()) << server.log();
    ASSERT_EQ(::truncate(weights.c_str(), 0), 0);
    v1::GenerateResponse truncated;
    ASSERT_TRUE(Generate(server, req, &truncated).ok()) << server.log();
    for (const auto* r : {&rewritten, &truncated}) {
      EXPECT_EQ(std::vector<int32_t>(r->token_ids().begin(), r->token_ids().end()),
                std::vector<int32_t>(before.token_ids().begin(), before.token_ids().end()))
          << "mmap=" << map;
      for (int i = 0; i < r->tokens_size(); ++i) {
        EXPECT_EQ(r->tokens(i).logprob(), before.tokens(i).logprob()) << "mmap=" << map;
      }
    }
    if (map) {
      EXPECT_THAT(server.log(), HasSubstr("is being changed by another process"));
    }
    EXPECT_EQ(server.SignalAndWait(SIGTERM, 20), 0);
  }
}

TEST(E2eMetricsTest, UnknownAdapterNamesDoNotGrowTheExposition) {
  ServerProcess server(Model());
  ASSERT_TRUE(server.ok()) << server.log();
  auto stub = server.Generation();
  auto send = [&](const std::string& adapter) {
    grpc::ClientContext ctx;
    v1::GenerateResponse resp;
    return stub->Generate(&ctx, IdsRequest({1, 2, 3}, adapter, 1), &resp);
  };
  ASSERT_EQ(send("warm-up").error_code(), grpc::StatusCode::NOT_FOUND);
  const std::string before = Scrape(server.metrics_port());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2500; ++i) {
        EXPECT_EQ(send("no-such-adapter-" + std::to_string(t) + "-" + std::to_string(i)).error_code(),
                  grpc::StatusCode::NOT_FOUND);
      }
    });
  }
  for (auto& t : threads) t.join();
  const std::string after = Scrape(server.metrics_port());
  EXPECT_EQ(SeriesNames(after), SeriesNames(before));  // Only values changed.
  EXPECT_LT(after.size(), before.size() + before.size() / 50);
  EXPECT_EQ(Series(after, "adapterd_requests_total{adapter=\"<not loaded>\",code=\"NOT_FOUND\"}"),
            10001);
  EXPECT_THAT(after, Not(HasSubstr("no-such-adapter")));
}

TEST(E2eMetricsTest, ASlowScraperDoesNotDelayAnother) {
  ServerProcess server(Model());
  ASSERT_TRUE(server.ok()) << server.log();
  // Clients that send a few bytes of a request head and then stall.
  std::vector<int> stalled;
  for (int i = 0; i < 3; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server.metrics_port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ASSERT_EQ(::send(fd, "GET /met", 8, 0), 8);
    stalled.push_back(fd);
  }
  const auto start = std::chrono::steady_clock::now();
  const std::string text = Scrape(server.metrics_port());
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_THAT(text, HasSubstr("adapterd_queue_depth"));
  EXPECT_LT(took, std::chrono::seconds(2));
  for (int fd : stalled) ::close(fd);
}

TEST(E2eMetricsTest, EveryOutcomeIsCountedOnceWithItsOwnCode) {
  ServerProcess server(Model(), {"--preload=qv=lora_qv"});
  ASSERT_TRUE(server.ok()) << server.log();
  auto stub = server.Generation();
  // OK, unary and streamed.
  for (int i = 0; i < 3; ++i) {
    v1::GenerateResponse resp;
    ASSERT_TRUE(Generate(server, IdsRequest({1, 2, 3}, "qv", 4), &resp).ok());
  }
  {
    grpc::ClientContext ctx;
    auto reader = stub->GenerateStream(&ctx, IdsRequest({1, 2, 3}, "", 4));
    v1::GenerateStreamResponse chunk;
    while (reader->Read(&chunk)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  // Refused by validation, unary and streamed.
  v1::GenerateRequest bad = IdsRequest({1, 2, 3}, "", 4);
  bad.set_top_p(2);
  v1::GenerateResponse resp;
  EXPECT_EQ(Generate(server, bad, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  {
    grpc::ClientContext ctx;
    auto reader = stub->GenerateStream(&ctx, bad);
    v1::GenerateStreamResponse chunk;
    while (reader->Read(&chunk)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // A deadline that passes mid-generation is a deadline, not a cancellation.
  EXPECT_EQ(Generate(server, IdsRequest({1, 2, 3}, "", 250), &resp, 30).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  // The scheduler reports the deadline on its next step; wait for the counter (bounded).
  std::string text;
  for (int i = 0; i < 200; ++i) {
    text = Scrape(server.metrics_port());
    if (Series(text, "adapterd_requests_total{adapter=\"\",code=\"DEADLINE_EXCEEDED\"}") >= 1 &&
        Series(text, "adapterd_running_requests") == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"qv\",code=\"OK\"}"), 3);
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"\",code=\"OK\"}"), 1);
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"\",code=\"INVALID_ARGUMENT\"}"), 2);
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"\",code=\"DEADLINE_EXCEEDED\"}"), 1);
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"\",code=\"CANCELLED\"}"), 0);
  // Nothing runs any more, so the gauges are back to zero.
  EXPECT_EQ(Series(text, "adapterd_running_requests"), 0);
  EXPECT_EQ(Series(text, "adapterd_kv_cache_usage_ratio"), 0);
}

TEST(E2eMetricsTest, QueueFullRefusalsAreCounted) {
  ServerProcess server(Model(), {"--max_queue=1", "--max_batch_rows=1"});
  ASSERT_TRUE(server.ok()) << server.log();
  std::atomic<int> exhausted{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateResponse resp;
      grpc::Status s = Generate(server, IdsRequest({1, 2, static_cast<int32_t>(i)}, "", 120), &resp);
      if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) exhausted.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_GE(exhausted.load(), 1);
  const std::string text = Scrape(server.metrics_port());
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"\",code=\"RESOURCE_EXHAUSTED\"}"),
            exhausted.load());
  EXPECT_EQ(Series(text, "adapterd_requests_total{adapter=\"\",code=\"OK\"}"), 8 - exhausted.load());
}

TEST(E2eAdminStateTest, UnloadCountsOneReferencePerRequestInFlight) {
  ServerProcess server(Model(), {"--preload=qv=lora_qv"});
  ASSERT_TRUE(server.ok()) << server.log();
  using Steady = std::chrono::steady_clock;
  auto seconds = [](Steady::time_point t) {
    return std::chrono::duration<double>(t.time_since_epoch()).count();
  };
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateStreamResponse>>> readers;
  std::vector<double> sent, first;
  auto stub = server.Generation();
  for (int i = 0; i < 8; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    sent.push_back(seconds(Steady::now()));
    readers.push_back(stub->GenerateStream(
        contexts.back().get(), IdsRequest({1, 2, static_cast<int32_t>(300 + i)}, "qv", 240)));
    v1::GenerateStreamResponse chunk;
    ASSERT_TRUE(readers.back()->Read(&chunk));
    first.push_back(seconds(Steady::now()));
  }
  grpc::ClientContext ctx;
  v1::UnloadAdapterRequest req;
  req.set_name("qv");
  v1::UnloadAdapterResponse unloaded;
  const double unload_sent = seconds(Steady::now());
  ASSERT_TRUE(server.Admin()->UnloadAdapter(&ctx, req, &unloaded).ok());
  const double unload_answered = seconds(Steady::now());
  // A stream's server-side end lies in [sent + total, first chunk + total]: count the streams
  // surely still running when the unload answered, and those surely done before it started.
  int surely_running = 0, surely_done = 0;
  for (size_t i = 0; i < readers.size(); ++i) {
    v1::GenerateStreamResponse chunk;
    double total = 0;
    while (readers[i]->Read(&chunk)) {
      if (chunk.has_stats()) total = chunk.stats().total_seconds();
    }
    ASSERT_TRUE(readers[i]->Finish().ok());
    if (sent[i] + total > unload_answered) ++surely_running;
    if (first[i] + total < unload_sent) ++surely_done;
  }
  EXPECT_GE(static_cast<int>(unloaded.in_flight_references()), surely_running);
  EXPECT_LE(static_cast<int>(unloaded.in_flight_references()), 8 - surely_done);
  EXPECT_GE(surely_running, 1);  // The check above was not vacuous.
}

TEST(E2eLoggingTest, JsonLogLinesAllParse) {
  const std::string dir = TempDir("json_logs");
  fs::create_directories(dir + "/root/bad");
  WriteFile(dir + "/root/bad/adapter_config.json", "{\"peft_type\": \"LORA\", \"r\": \"\\\"8\\\"\"}");
  ServerProcess server(Model(), {"--log_format=json", "--adapter_root=" + dir + "/root"});
  ASSERT_TRUE(server.ok()) << server.log();
  grpc::ClientContext ctx;
  v1::LoadAdapterRequest req;
  req.set_name("bad");
  req.set_path("bad");
  v1::LoadAdapterResponse resp;
  EXPECT_FALSE(server.Admin()->LoadAdapter(&ctx, req, &resp).ok());
  EXPECT_EQ(server.SignalAndWait(SIGTERM, 20), 0);
  std::istringstream lines(server.log());
  std::string line;
  int parsed = 0;
  bool saw_quote = false;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] != '{') continue;  // LibTorch/gRPC may print their own lines.
    auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << line;
    ASSERT_TRUE(j.contains("msg")) << line;
    saw_quote |= j["msg"].get<std::string>().find('"') != std::string::npos;
    ++parsed;
  }
  EXPECT_GE(parsed, 4);
  EXPECT_TRUE(saw_quote);  // The refusal names the adapter in quotes.
}

}  // namespace
}  // namespace adapterd::testing
