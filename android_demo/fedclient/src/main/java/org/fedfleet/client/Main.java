package org.fedfleet.client;

import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.URI;
import java.nio.file.Path;
import java.security.SecureRandom;
import java.util.Random;

/**
 * A Java phone from the command line, to join a running {@code fedfleet serve} (or a
 * simulate/fleet run's server):
 *
 * <pre>
 * java -cp fedclient.jar:android-json.jar org.fedfleet.client.Main --server http://127.0.0.1:8080 --name java-0
 *     [--shard 0/3] [--examples N] [--data FILE] [--seed S] [--max-errors 20] [--inline-model yes|no]
 *     [--chain-checkin yes|no] [--manifest BUNDLE/manifest.json]
 * </pre>
 *
 * It trains on the bundled digits sample (or FILE in the same format), runs until the server
 * says done, and prints one JSON line of its stats. Exit status 0 when done, 1 on error.
 * {@code --inline-model no} stops asking for the model inside check-in answers (it then comes
 * from GET /v1/model), to compare; {@code --chain-checkin no} stops asking for the next check-in
 * with each upload (each task then starts with its own POST /v1/checkin). {@code --manifest} names the
 * manifest of the bundle this phone runs: its model fingerprint goes with the registration, and a
 * server whose task is another model refuses the phone (409 model_mismatch, exit 1).
 */
public final class Main {
  private Main() {}

  public static void main(String[] argv) {
    try {
      PhoneStats stats = run(Args.parse(argv));
      System.out.println(stats.toJson());
    } catch (IllegalArgumentException e) {
      System.err.println("fedclient: " + e.getMessage());
      System.err.println("usage: Main --server URL --name NAME [--shard I/N] [--examples N] [--data FILE] "
          + "[--seed S] [--max-errors N] [--inline-model yes|no] [--chain-checkin yes|no] [--manifest FILE]");
      System.exit(2);
    } catch (IOException | RuntimeException e) {
      System.err.println("fedclient: " + e);
      System.exit(1);
    }
  }

  static PhoneStats run(Args a) throws IOException {
    Dataset data = load(a.data).shard(a.shardIndex, a.shardCount).take(a.examples);
    // With --seed, everything is reproducible (tests); without, the codec's noise comes from SecureRandom.
    Random trainRng = a.seed == null ? new SecureRandom() : new Random(a.seed);
    Random codecRng = a.seed == null ? new SecureRandom() : new Random(a.seed * 31 + 7);
    Http http = new Http(URI.create(a.server), Http.REAL_SLEEP, new Random());
    FedClient client = new FedClient(http, a.name, new MlpTrainer(data), trainRng, codecRng)
        .inlineModel(a.inlineModel).chainCheckin(a.chainCheckin);
    if (a.manifest != null) {
      client.modelFingerprint(BundleManifest.fingerprint(BundleManifest.read(Path.of(a.manifest))));
    }
    client.register();
    return client.run(a.maxErrors);
  }

  private static Dataset load(String path) throws IOException {
    if (path == null) {
      return Digits.bundled();
    }
    try (InputStream in = new FileInputStream(path)) {
      return Digits.read(in);
    }
  }

  /** Command-line flags; unknown flags are an error, not silently ignored. */
  static final class Args {
    String server;
    String name = "java-phone";
    int shardIndex = 0;
    int shardCount = 1;
    int examples = Integer.MAX_VALUE;
    String data;
    Long seed;
    int maxErrors = 20;
    boolean inlineModel = true;
    boolean chainCheckin = true;
    String manifest;

    static Args parse(String[] argv) {
      Args a = new Args();
      for (int i = 0; i < argv.length; i += 2) {
        if (i + 1 >= argv.length) {
          throw new IllegalArgumentException(argv[i] + " needs a value");
        }
        String v = argv[i + 1];
        switch (argv[i]) {
          case "--server" -> a.server = v;
          case "--name" -> a.name = v;
          case "--shard" -> {
            String[] parts = v.split("/");
            if (parts.length != 2) {
              throw new IllegalArgumentException("--shard takes INDEX/COUNT, e.g. 0/3");
            }
            a.shardIndex = Integer.parseInt(parts[0]);
            a.shardCount = Integer.parseInt(parts[1]);
          }
          case "--examples" -> a.examples = Integer.parseInt(v);
          case "--data" -> a.data = v;
          case "--seed" -> a.seed = Long.parseLong(v);
          case "--max-errors" -> a.maxErrors = Integer.parseInt(v);
          case "--inline-model" -> a.inlineModel = yesNo("--inline-model", v);
          case "--chain-checkin" -> a.chainCheckin = yesNo("--chain-checkin", v);
          case "--manifest" -> a.manifest = v;
          default -> throw new IllegalArgumentException("unknown flag " + argv[i]);
        }
      }
      if (a.server == null) {
        throw new IllegalArgumentException("--server is required");
      }
      return a;
    }

    private static boolean yesNo(String flag, String v) {
      if (!v.equals("yes") && !v.equals("no")) {
        throw new IllegalArgumentException(flag + " takes yes or no");
      }
      return v.equals("yes");
    }
  }
}
