// `adapterd serve`: loads the model, starts the generation listener (Generation, health,
// reflection), the admin listener (Admin, health) and the metrics listener, and drains
// gracefully on SIGTERM/SIGINT.
#pragma once

namespace adapterd::server {

// Runs until a termination signal has been handled; returns the process exit code.
int RunServe();

}  // namespace adapterd::server
