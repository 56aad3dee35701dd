package org.fedfleet.demo;

import android.content.Context;
import androidx.work.Constraints;
import androidx.work.ExistingPeriodicWorkPolicy;
import androidx.work.ExistingWorkPolicy;
import androidx.work.NetworkType;
import androidx.work.OneTimeWorkRequest;
import androidx.work.PeriodicWorkRequest;
import androidx.work.WorkManager;
import java.util.concurrent.TimeUnit;

/**
 * When the phone trains. In the background only on an unmetered network, while charging and
 * idle (the conditions of Bonawitz et al., 2019, "Towards Federated Learning at Scale"), so
 * the owner never pays for it in data, battery or responsiveness; "Train now" only needs a
 * network, for the demo.
 */
final class Participation {
  private static final String PERIODIC = "fedfleet-participation";
  private static final String NOW = "fedfleet-now";

  private Participation() {}

  static void background(Context context, boolean on) {
    WorkManager wm = WorkManager.getInstance(context);
    if (!on) {
      wm.cancelUniqueWork(PERIODIC);
      return;
    }
    Constraints constraints = new Constraints.Builder()
        .setRequiredNetworkType(NetworkType.UNMETERED)
        .setRequiresCharging(true)
        .setRequiresDeviceIdle(true)
        .build();
    PeriodicWorkRequest work = new PeriodicWorkRequest.Builder(ParticipationWorker.class, 15, TimeUnit.MINUTES)
        .setConstraints(constraints)
        .build();
    wm.enqueueUniquePeriodicWork(PERIODIC, ExistingPeriodicWorkPolicy.UPDATE, work);
  }

  static void now(Context context) {
    Constraints constraints = new Constraints.Builder().setRequiredNetworkType(NetworkType.CONNECTED).build();
    OneTimeWorkRequest work = new OneTimeWorkRequest.Builder(ParticipationWorker.class)
        .setConstraints(constraints)
        .build();
    WorkManager.getInstance(context).enqueueUniqueWork(NOW, ExistingWorkPolicy.KEEP, work);
  }
}
