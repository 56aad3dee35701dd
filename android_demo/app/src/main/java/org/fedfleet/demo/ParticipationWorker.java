package org.fedfleet.demo;

import android.content.Context;
import androidx.annotation.NonNull;
import androidx.work.Worker;
import androidx.work.WorkerParameters;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.net.URI;
import java.security.SecureRandom;
import java.util.Random;
import org.fedfleet.client.Dataset;
import org.fedfleet.client.FedClient;
import org.fedfleet.client.Http;
import org.fedfleet.client.MlpTrainer;
import org.fedfleet.client.ServerException;
import org.fedfleet.client.Task;
import org.fedfleet.client.Trainer;
import org.json.JSONObject;

/**
 * One participation session: enroll (or resume with the kept token), then check in and train
 * until the server has nothing more for now, or the session's time is up (WorkManager stops a
 * worker after 10 minutes). Failures ask WorkManager to retry later with its own backoff.
 */
public final class ParticipationWorker extends Worker {
  private static final long BUDGET_MS = 8 * 60 * 1000;

  public ParticipationWorker(@NonNull Context context, @NonNull WorkerParameters params) {
    super(context, params);
  }

  @NonNull
  @Override
  public Result doWork() {
    PhoneState state = new PhoneState(getApplicationContext());
    if (state.server().isEmpty()) {
      return Result.failure();
    }
    try {
      Dataset data = state.trainingData();
      Http http = new Http(URI.create(state.server()), Http.REAL_SLEEP, new SecureRandom());
      Random rng = new SecureRandom();
      // The trainer depends on the task, which enrollment returns: enroll with a stand-in first.
      FedClient probe = new FedClient(http, state.name(), new MlpTrainer(data), rng, rng, state.accountant());
      Task task = enroll(probe, state);
      FedClient client = new FedClient(http, state.name(), trainer(probe, task, data), rng, rng, state.accountant());
      client.resume(state.token());
      // WorkManager may stop this worker after any upload (budget spent, phone unplugged or in
      // use): a check-in made with that upload could hand it a task it never does, which the
      // round would wait for until its deadline (FORMAT.md section 9). So check in on its own.
      client.chainCheckin(false);
      long end = System.currentTimeMillis() + BUDGET_MS;
      String action = "";
      while (System.currentTimeMillis() < end && !action.equals("done") && !isStopped()) {
        action = client.step();
        state.accountant(client.accountant());
        state.stats(client.stats().toJson());
      }
      return Result.success();
    } catch (ServerException e) {
      if (e.status == 401) {
        state.token(null); // the server forgot this phone (new data dir): enroll again next time
      }
      return e.status == 400 ? Result.failure() : Result.retry();
    } catch (IOException | RuntimeException e) {
      return Result.retry();
    }
  }

  private static Task enroll(FedClient client, PhoneState state) throws IOException {
    if (state.token() != null) {
      return client.resume(state.token());
    }
    Task task = client.register();
    state.token(client.token());
    return task;
  }

  /**
   * ExecuTorch on the server's training program when the server offers the bundle (the file
   * is checked against the manifest's sha256); the plain-Java trainer otherwise.
   */
  private Trainer trainer(FedClient client, Task task, Dataset data) throws IOException {
    JSONObject manifest;
    byte[] program;
    try {
      manifest = client.bundleManifest();
      program = client.downloadBundleFile("model.pte");
    } catch (ServerException e) {
      if (e.status == 404) {
        return new MlpTrainer(data); // this server serves no bundle
      }
      throw e;
    }
    File file = new File(getApplicationContext().getFilesDir(), "model.pte");
    try (FileOutputStream out = new FileOutputStream(file)) {
      out.write(program);
    }
    return new ExecuTorchTrainer(file, data, task.inputShape(), manifest.optInt("max_batch", 32));
  }
}
