package org.fedfleet.client;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Deque;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * A scripted server on a loopback port: each path answers from a queue of canned responses
 * (the last one repeats), whatever its query, and every request is recorded (with its query).
 */
final class FakeServer implements AutoCloseable {
  record Reply(int status, byte[] body, Map<String, String> headers) {
    static Reply json(int status, String body) {
      return new Reply(status, body.getBytes(java.nio.charset.StandardCharsets.UTF_8),
          Map.of("Content-Type", "application/json"));
    }
  }

  record Request(String method, String path, Map<String, String> headers, byte[] body, String query) {}

  private final HttpServer server;
  private final Map<String, Deque<Reply>> replies = new HashMap<>();
  final List<Request> requests = new ArrayList<>();

  FakeServer() throws IOException {
    server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
    server.createContext("/", this::handle);
    server.start();
  }

  URI uri() {
    return URI.create("http://127.0.0.1:" + server.getAddress().getPort());
  }

  synchronized FakeServer on(String path, Reply... queue) {
    replies.put(path, new ArrayDeque<>(List.of(queue)));
    return this;
  }

  synchronized List<Request> requestsTo(String path) {
    return requests.stream().filter(r -> r.path().equals(path)).toList();
  }

  private void handle(HttpExchange ex) throws IOException {
    byte[] body = ex.getRequestBody().readAllBytes();
    Map<String, String> headers = new HashMap<>();
    ex.getRequestHeaders().forEach((k, v) -> headers.put(k.toLowerCase(), v.get(0)));
    Reply reply;
    synchronized (this) {
      String path = ex.getRequestURI().getPath();
      requests.add(new Request(ex.getRequestMethod(), path, headers, body, ex.getRequestURI().getRawQuery()));
      Deque<Reply> q = replies.get(path);
      reply = q == null ? Reply.json(404, "{\"error\":\"not_found\",\"message\":\"no route\"}")
          : q.size() > 1 ? q.poll() : q.peek();
    }
    reply.headers().forEach((k, v) -> ex.getResponseHeaders().add(k, v));
    boolean empty = reply.status() == 304 || reply.body().length == 0;
    ex.sendResponseHeaders(reply.status(), empty ? -1 : reply.body().length);
    if (!empty) {
      try (OutputStream out = ex.getResponseBody()) {
        out.write(reply.body());
      }
    }
    ex.close();
  }

  @Override
  public void close() {
    server.stop(0);
  }
}
